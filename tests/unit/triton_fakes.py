"""What the worker's fake Tritons answer: each text echoed back as the model's TEXT output."""

from aimesh.v1 import result_pb2
from aimesh.worker.inference import Inference


def echoed(texts: list[str]) -> list[Inference]:
    out = []
    for text in texts:
        output = result_pb2.TaskOutput()
        output.tensors.add(name="TEXT", datatype="BYTES", shape=[1], string_data=[text])
        out.append(Inference(output=output, model_version="1"))
    return out
