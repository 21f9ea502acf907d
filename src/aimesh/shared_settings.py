"""What the settings of every service share: where Kafka is, its topics and the extra librdkafka properties
(``KafkaSettings``), and for the gRPC servers authentication, TLS and connection limits (``ServerSettings``).
Read with the precedence ``settings`` describes."""

from __future__ import annotations

import json
from typing import Any

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_CONFIG = SettingsConfigDict(env_prefix="AIMESH_", frozen=True, extra="ignore")

# librdkafka properties aimesh sets itself because its guarantees rest on them (durable acknowledgements,
# explicit commits, transactions); AIMESH_KAFKA_CONFIG may not override them.
RESERVED_KAFKA_PROPERTIES = frozenset(
    {
        "bootstrap.servers",
        "group.id",
        "client.id",
        "enable.idempotence",
        "acks",
        "enable.auto.commit",
        "enable.auto.offset.store",
        "isolation.level",
        "transactional.id",
        "group.protocol",
        "group.remote.assignor",
        "partition.assignment.strategy",
    }
)

TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class KafkaSettings(BaseSettings):
    """Where the broker is and which topics carry tasks and results."""

    model_config = _CONFIG

    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, comma separated.")
    tasks_topic: str = Field("aimesh.tasks", description="Topic that carries AITaskEvent records.")
    batch_tasks_topic: str = Field(
        "aimesh.tasks.batch", description="Topic that carries the AITaskEvent records of batch-priority tasks."
    )
    cancel_topic: str = Field(
        "aimesh.tasks.cancel", description="Topic that carries AICancelEvent records (cancellation requests)."
    )
    results_topic: str = Field("aimesh.results", description="Topic that carries AIResultEvent records.")
    dead_letter_topic: str = Field(
        "aimesh.tasks.dlq", description="Topic that receives task records the worker cannot process, with the reason."
    )
    max_record_bytes: int = Field(
        1_000_000,
        ge=65536,
        description="Largest Kafka record (key, value and headers) a service produces: librdkafka's "
        "message.max.bytes default, below the broker's default max.message.bytes. Ingest refuses a task whose record "
        "would be larger; the worker shrinks a result or dead-letter record that would be.",
    )
    log_level: str = Field("INFO", description="Python log level for the service.")
    log_format: str = Field(
        "auto", pattern="^(auto|json|text)$", description="json, text, or auto (text on a terminal, else JSON)."
    )
    metrics_host: str = Field(
        "127.0.0.1", description="Address the Prometheus metrics endpoint binds (0.0.0.0: every interface)."
    )
    kafka_config: SecretStr = Field(
        SecretStr(""),
        description="JSON object of extra librdkafka properties (security.protocol, sasl.*, ssl.*) merged into "
        "every Kafka client config.",
    )

    def kafka_client_config(self) -> dict[str, Any]:
        """The extra librdkafka properties of ``AIMESH_KAFKA_CONFIG`` (empty when unset).

        Checked here, when a service builds its clients, rather than by a pydantic validator: a validation
        error would print the input, passwords included. Raises ValueError.
        """
        return _parse_kafka_config(self.kafka_config.get_secret_value())


def _parse_kafka_config(text: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"AIMESH_KAFKA_CONFIG is not JSON: {e.msg}") from None  # never echo the secrets
    if not isinstance(parsed, dict):
        raise ValueError("AIMESH_KAFKA_CONFIG must be a JSON object of librdkafka properties")
    reserved = sorted(RESERVED_KAFKA_PROPERTIES & parsed.keys())
    if reserved:
        raise ValueError(f"AIMESH_KAFKA_CONFIG may not set {', '.join(reserved)}: aimesh sets them itself")
    bad = sorted(k for k, v in parsed.items() if not isinstance(v, str | int | float | bool))
    if bad:
        raise ValueError(f"AIMESH_KAFKA_CONFIG values must be strings, numbers or booleans: {', '.join(bad)}")
    return parsed


class ServerSettings(KafkaSettings):
    """What every gRPC server (ingest, notifier) shares: authentication, TLS and message size."""

    auth: str = Field(
        "on",
        pattern="^(on|off)$",
        description="on: every call needs an API key; off: no keys, every task in the default tenant "
        "(local development only).",
    )
    api_keys_file: str = Field(
        "", description="File of API key hashes, one `tenant:sha256hex` line each (# comments allowed)."
    )
    api_keys: str = Field("", description="More `tenant:sha256hex` entries, separated by commas or whitespace.")
    default_tenant: str = Field(
        "default", pattern=TENANT_PATTERN, description="The tenant of every task while auth is off."
    )
    tls_cert_file: str = Field("", description="PEM certificate chain of the gRPC server; with the key, TLS is on.")
    tls_key_file: str = Field("", description="PEM private key of the gRPC server.")
    tls_client_ca_file: str = Field(
        "", description="PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS)."
    )
    max_message_bytes: int = Field(
        4 << 20, ge=1024, description="Largest gRPC message received or sent; larger ones get RESOURCE_EXHAUSTED."
    )
    grpc_keepalive_time_s: float = Field(
        60.0, gt=0, description="The gRPC server pings a connection quiet for this long, to find dead clients."
    )
    grpc_keepalive_timeout_s: float = Field(
        20.0, gt=0, description="A connection whose client does not answer a keepalive ping in this time is closed."
    )
    grpc_max_connection_age_s: float = Field(
        1800.0,
        gt=0,
        description="The gRPC server asks a client to reconnect (GOAWAY) once its connection is this old, so load "
        "rebalances and no connection lives forever.",
    )
    grpc_max_connection_age_grace_s: float = Field(
        60.0,
        ge=0,
        description="Calls still open on a connection past its maximum age get this long, then end UNAVAILABLE "
        "(the client library resumes watches with after_sequence).",
    )

    @model_validator(mode="after")
    def _tls_files_come_together(self) -> ServerSettings:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("AIMESH_TLS_CERT_FILE and AIMESH_TLS_KEY_FILE are set together or not at all")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError(
                "AIMESH_TLS_CLIENT_CA_FILE (mutual TLS) needs AIMESH_TLS_CERT_FILE and AIMESH_TLS_KEY_FILE"
            )
        return self

    @property
    def auth_enabled(self) -> bool:
        return self.auth == "on"


class ObjectStoreSettings(BaseSettings):
    """The S3-compatible object store that holds tensor contents too large to travel inside a Kafka record (the claim
    check, ``aimesh.objects``). Its credentials come from boto3's default chain (``AWS_ACCESS_KEY_ID`` and
    ``AWS_SECRET_ACCESS_KEY``, a profile, an instance role), never from these settings."""

    model_config = _CONFIG

    object_store_url: str = Field(
        "",
        description="Endpoint URL of the S3-compatible object store (e.g. http://127.0.0.1:8333); empty: no store, "
        "and tensor contents over AIMESH_INLINE_LIMIT_BYTES are refused.",
    )
    object_store_bucket: str = Field("aimesh", min_length=3, description="Bucket of the tensor contents.")
    object_store_region: str = Field("us-east-1", description="Region the object store client signs requests for.")
    inline_limit_bytes: int = Field(
        262_144,
        ge=0,
        description="Tensor contents up to this size travel inside the Kafka record; larger ones go to the object "
        "store and the record carries a reference (bucket, key, size, SHA-256).",
    )
    max_object_bytes: int = Field(
        268_435_456, gt=0, description="Largest object (one tensor's contents) written to or read from the store."
    )
    object_retention_s: float = Field(
        3600.0,
        gt=0,
        description="Objects last written longer ago than this are deleted by the sweeper (the notifier's default "
        "AIMESH_RETENTION_S: a result's outputs stay as long as the result).",
    )
    object_sweep_interval_s: float = Field(
        300.0, gt=0, description="How often the sweeper deletes the objects past AIMESH_OBJECT_RETENTION_S."
    )
    object_store_connect_timeout_s: float = Field(
        2.0, gt=0, description="Connect timeout of each object store request (botocore retries it, standard mode)."
    )
    object_store_read_timeout_s: float = Field(
        30.0, gt=0, description="Read timeout of each object store request."
    )

    @model_validator(mode="after")
    def _inline_contents_fit_a_record(self) -> ObjectStoreSettings:
        record_bytes = getattr(self, "max_record_bytes", None)
        if record_bytes is not None and self.inline_limit_bytes >= record_bytes:
            raise ValueError(
                "AIMESH_INLINE_LIMIT_BYTES must be under AIMESH_MAX_RECORD_BYTES: inline contents travel in a "
                "Kafka record"
            )
        return self
