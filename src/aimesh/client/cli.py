"""`aimesh`: submit tasks to the mesh and follow them from a shell, on the client library.

Exit codes: 0 success (for a command that waits: the task SUCCEEDED); 1 a call failed (one line on stderr
with the gRPC code, the message and the error's reason); 2 a usage error; 3 the task ended FAILED, EXPIRED
or CANCELLED; 130 interrupted. ``--json`` prints one JSON object per line on stdout (protobuf JSON).

A task carries text, or tensors: an image (``--image``, decoded with Pillow) or numpy arrays (``--tensor``);
``--output-dir`` writes its raw outputs (an image a model returns, arrays) to files.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import click
import numpy.typing as npt
from google.protobuf import json_format
from google.protobuf.message import Message

from aimesh import events
from aimesh.client import files, payloads
from aimesh.client.async_client import (
    DEFAULT_INGEST_ADDRESS,
    DEFAULT_NOTIFIER_ADDRESS,
    PRIORITIES,
    AsyncClient,
    TaskSpec,
)
from aimesh.client.errors import ClientError
from aimesh.client.render import StatusLine, failure_line, output_lines, partial_text, status_name, text_output
from aimesh.client.targets import grpc_target
from aimesh.client.tls import ClientTls
from aimesh.v1 import notifier_pb2, result_pb2

EXIT_OK = 0
EXIT_CALL_FAILED = 1
EXIT_USAGE = 2
EXIT_TASK_UNSUCCESSFUL = 3
EXIT_INTERRUPTED = 130

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class Duration(click.ParamType[timedelta]):
    """``500ms``, ``30s``, ``2m``, ``1h`` or plain seconds, as a timedelta."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> timedelta:
        if isinstance(value, timedelta):
            return value
        match = _DURATION.match(str(value))
        if match is None:
            self.fail(f"{value!r} is not a duration such as 500ms, 30s, 2m or 1h", param, ctx)
        seconds = float(match.group(1)) * _UNIT_S[match.group(2) or "s"]
        if seconds <= 0:
            self.fail(f"{value!r} is not a positive duration", param, ctx)
        return timedelta(seconds=seconds)


def _addresses(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        grpc_target(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx, param) from None
    return value


def _parameters(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    parameters = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", ctx, param)
        parameters[key] = value
    return parameters


@dataclass(frozen=True)
class Options:
    ingest_address: str
    notifier_address: str
    api_key: str | None
    tls: ClientTls | None
    timeout: timedelta
    as_json: bool

    def client(self) -> AsyncClient:
        return AsyncClient(
            self.ingest_address,
            self.notifier_address,
            api_key=self.api_key,
            tls=self.tls,
            timeout_s=self.timeout.total_seconds(),
        )


_file = click.Path(exists=True, dir_okay=False, path_type=Path)
_output_dir = click.option(
    "--output-dir", type=click.Path(file_okay=False, path_type=Path),
    help="Write the task's raw outputs to files here (submit: with --wait): a BYTES output of one element as "
    "NAME (NAME.png for a PNG), any other as NAME.npy; outputs held by reference are downloaded.",
)  # fmt: skip


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--ingest-address", envvar="AIMESH_INGEST_ADDRESS", default=DEFAULT_INGEST_ADDRESS, show_default=True,
    callback=_addresses,
    help="host:port of ingest; several replicas comma separated (IP addresses), calls spread over them "
    "[env AIMESH_INGEST_ADDRESS].",
)  # fmt: skip
@click.option(
    "--notifier-address", envvar="AIMESH_NOTIFIER_ADDRESS", default=DEFAULT_NOTIFIER_ADDRESS, show_default=True,
    callback=_addresses,
    help="host:port of the notifier; several as for ingest [env AIMESH_NOTIFIER_ADDRESS].",
)  # fmt: skip
@click.option("--api-key", envvar="AIMESH_API_KEY", help="API key, sent as a bearer token [env AIMESH_API_KEY].")
@click.option("--tls", is_flag=True, envvar="AIMESH_CLIENT_TLS", help="Use TLS (implied by the TLS file options).")
@click.option("--ca-file", type=_file, envvar="AIMESH_CLIENT_CA_FILE", help="CA certificate (PEM) of the servers.")
@click.option("--cert-file", type=_file, envvar="AIMESH_CLIENT_CERT_FILE", help="Client certificate, mutual TLS.")
@click.option("--key-file", type=_file, envvar="AIMESH_CLIENT_KEY_FILE", help="Client certificate's key.")
@click.option(
    "--timeout", type=Duration(), default="30s", show_default=True, envvar="AIMESH_CLIENT_TIMEOUT",
    help="Deadline of each call, retries included (not of waiting for a task).",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per line (protobuf JSON).")
@click.pass_context
def main(
    ctx: click.Context,
    ingest_address: str,
    notifier_address: str,
    api_key: str | None,
    tls: bool,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    timeout: timedelta,
    as_json: bool,
) -> None:
    """Submit inference tasks to the aimesh mesh and follow them.

    Exit codes: 0 success; 1 a call failed (the gRPC code is printed); 2 usage error; 3 the task ended
    FAILED, EXPIRED or CANCELLED; 130 interrupted.
    """
    if (cert_file is None) != (key_file is None):
        raise click.UsageError("--cert-file and --key-file go together")
    client_tls = None
    if tls or ca_file or cert_file:
        client_tls = ClientTls(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
    ctx.obj = Options(ingest_address, notifier_address, api_key, client_tls, timeout, as_json)


@main.command()
@click.argument("model")
@click.argument("text", required=False)
@click.option("--image", type=_file, help="Send this image (PNG, decoded with Pillow) as a UINT8 tensor, grey HxW.")
@click.option("--keep-color", is_flag=True, help="Send --image as RGB, HxWx3.")
@click.option("--input-name", default="IMAGE", show_default=True, help="The model input --image is sent as.")
@click.option("--tensor", "arrays", multiple=True, callback=files.tensor_files, metavar="NAME=FILE.npy",
              help="Send a numpy array (.npy) as input NAME, its datatype from its dtype; repeatable.")  # fmt: skip
@click.option("--param", "-p", "parameters", multiple=True, callback=_parameters, metavar="KEY=VALUE",
              help="A model parameter; repeatable.")  # fmt: skip
@click.option("--deadline", type=Duration(), help="Expire the task if it has not started within this time.")
@click.option("--priority", type=click.Choice(sorted(PRIORITIES)), help="Priority class [default: interactive].")
@click.option("--idempotency-key", help="Resubmitting with the same key returns the first task's id.")
@click.option("--wait", "-w", is_flag=True, help="Follow the task to its end and print its output.")
@_output_dir
@click.pass_obj
def submit(
    options: Options,
    model: str,
    text: str | None,
    image: Path | None,
    keep_color: bool,
    input_name: str,
    arrays: dict[str, npt.NDArray[Any]],
    parameters: dict[str, str],
    deadline: timedelta | None,
    priority: str | None,
    idempotency_key: str | None,
    wait: bool,
    output_dir: Path | None,
) -> None:
    """Submit TEXT (`-`: standard input), or tensors (--image, --tensor), to MODEL; print the task id (with
    --wait: follow it to its end and print its outputs, or write them with --output-dir)."""
    if output_dir is not None and not wait:
        raise click.UsageError("--output-dir goes with --wait")
    text, tensors = files.task_input(text, image, keep_color, input_name, arrays)
    spec = TaskSpec(model, text, parameters, deadline, priority, idempotency_key, tensors=tensors)  # type: ignore[arg-type]

    async def run(client: AsyncClient) -> int:
        response = await client.submit_task(spec)
        if options.as_json:
            _print_json(response)
        elif wait:
            click.echo(f"submitted {response.task_id}" + (" (duplicate key)" if response.duplicate else ""), err=True)
        else:
            click.echo(response.task_id)
        return await _follow(client, options, response.task_id, output_dir=output_dir) if wait else EXIT_OK

    _run(options, run)


@main.command()
@click.argument("task_id")
@click.option("--after-sequence", type=click.IntRange(min=0), default=0, help="Resume after this update.")
@_output_dir
@click.pass_obj
def watch(options: Options, task_id: str, after_sequence: int, output_dir: Path | None) -> None:
    """Follow TASK_ID to its end: its status as it changes, streamed tokens, then its output."""
    _run(options, lambda client: _follow(client, options, task_id, after_sequence, output_dir))


@main.command()
@click.argument("task_id")
@_output_dir
@click.pass_obj
def get(options: Options, task_id: str, output_dir: Path | None) -> None:
    """Print TASK_ID's current state (exit 3 if it ended without success)."""

    async def run(client: AsyncClient) -> int:
        state = await client.get(task_id)
        if options.as_json:
            _print_json(state)
        else:
            click.echo(f"{status_name(state.status)} {state.task_id} model={state.model_name} seq={state.sequence}")
        if state.status == result_pb2.TASK_STATUS_SUCCEEDED:
            await _show_outputs(client, options, state, output_dir)
        return _exit_code(state)

    _run(options, run)


@main.command()
@click.argument("task_id")
@click.pass_obj
def cancel(options: Options, task_id: str) -> None:
    """Ask for TASK_ID to be cancelled (exit 0 also when it had ended already)."""

    async def run(client: AsyncClient) -> int:
        response = await client.cancel(task_id)
        if options.as_json:
            _print_json(response)
        elif response.outcome == notifier_pb2.CANCEL_OUTCOME_ALREADY_ENDED:
            click.echo(f"task {task_id} had ended already: {status_name(response.state.status)}")
        else:
            click.echo(f"cancellation of {task_id} requested")
        return EXIT_OK

    _run(options, run)


async def _follow(
    client: AsyncClient, options: Options, task_id: str, after_sequence: int = 0, output_dir: Path | None = None
) -> int:
    """Watch the task to its end, printing as it goes; the exit code its end calls for."""
    status = StatusLine(sys.stderr, task_id)
    streamed: list[str] = []
    final: notifier_pb2.TaskState | None = None
    try:
        async for state in client.watch(task_id, after_sequence=after_sequence):
            if options.as_json:
                _print_json(state)
            elif (tokens := partial_text(state)) is not None:
                status.clear()
                streamed.append(tokens)
                sys.stdout.write(tokens)
                sys.stdout.flush()
            elif not events.is_terminal(state.status):
                status.set(status_name(state.status))
            final = state
    finally:
        status.clear()
    if final is None or not events.is_terminal(final.status):
        return EXIT_OK  # resumed after the terminal update: nothing more to say
    if options.as_json:
        if final.status == result_pb2.TASK_STATUS_SUCCEEDED:
            await _show_outputs(client, options, final, output_dir)
    else:
        await _print_final(client, options, final, "".join(streamed), output_dir)
    return _exit_code(final)


async def _print_final(
    client: AsyncClient, options: Options, state: notifier_pb2.TaskState, streamed: str, output_dir: Path | None
) -> None:
    if streamed:
        click.echo()  # end the line of streamed tokens
    if state.status != result_pb2.TASK_STATUS_SUCCEEDED:
        click.echo(failure_line(state), err=True)
        return
    text = text_output(state.result)
    await _show_outputs(client, options, state, output_dir, shown=streamed if streamed == text else None)
    total = state.result.timings.total
    took = f" in {total.ToTimedelta().total_seconds():.2f} s" if total.ByteSize() else ""
    click.echo(f"SUCCEEDED {state.task_id}{took}", err=True)


async def _show_outputs(
    client: AsyncClient,
    options: Options,
    state: notifier_pb2.TaskState,
    output_dir: Path | None,
    shown: str | None = None,
) -> None:
    """Print the outputs as lines, the raw ones written to ``output_dir`` if given (then only where they went).
    ``shown``: the TEXT streamed already, token by token, not printed again. With --json, only the files."""
    written: dict[str, tuple[Path, int]] = {}
    if output_dir is not None:
        written = files.write_outputs(output_dir, state.result, await client.outputs(state))
    tensors = state.result.output.tensors
    for tensor, line in zip(tensors, output_lines(state.result), strict=True):
        if tensor.name in written:
            path, size = written[tensor.name]
            click.echo(f"{tensor.name}: wrote {path} ({size} bytes)", err=options.as_json)
        elif options.as_json or (shown and line.startswith("TEXT: ")):
            continue
        elif payloads.is_by_reference(tensor):
            click.echo(f"{line}; --output-dir DIR writes it to DIR/{files.planned_file(tensor)}")
        else:
            click.echo(line)


def _exit_code(state: notifier_pb2.TaskState) -> int:
    if events.is_terminal(state.status) and state.status != result_pb2.TASK_STATUS_SUCCEEDED:
        return EXIT_TASK_UNSUCCESSFUL
    return EXIT_OK


def _print_json(message: Message) -> None:
    click.echo(json_format.MessageToJson(message, indent=None))


def _run(options: Options, command: Callable[[AsyncClient], Awaitable[int]]) -> NoReturn:
    async def with_client() -> int:
        async with options.client() as client:
            return await command(client)

    try:
        code = asyncio.run(with_client())
    except ClientError as e:
        click.echo(f"aimesh: error: {e}", err=True)
        code = EXIT_CALL_FAILED
    except KeyboardInterrupt:
        click.echo("aimesh: interrupted", err=True)
        code = EXIT_INTERRUPTED
    sys.exit(code)


if __name__ == "__main__":
    main()
