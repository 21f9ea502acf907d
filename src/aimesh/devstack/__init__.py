"""The local stack: real Kafka and Triton plus the services, on loopback."""
