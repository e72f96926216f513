"""The wire between front ends and the engine-core process: msgpack frames over ZeroMQ.

    front end i   PUSH --> ipc://DIR/input     --> PULL   engine core (binds)
    front end i   PULL <-- ipc://DIR/output-i  <-- PUSH   engine core (connects)

Unix-domain sockets in a private temporary directory (mode 0700, so no other user can
connect). High-water marks are off on both ends: a message is never dropped and a send never
blocks (a front end that falls behind merges deltas; see RequestStream). Each frame is one
message of :mod:`pagedserve.engine.messages`, encoded by msgspec: requests as the tagged union
``CoreInput``, outputs as ``EngineCoreOutputs``.
"""

from __future__ import annotations

import os
import tempfile

import msgspec

from pagedserve.engine.messages import CoreInput, EngineCoreOutputs


def encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder()


def inputs_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(CoreInput)


def outputs_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(EngineCoreOutputs)


def ipc_addresses(num_clients: int) -> tuple[str, list[str]]:
    """The core's input address and one output address per front end, in a new private
    directory (its maker removes it at shutdown: :func:`remove_ipc_directory`)."""
    directory = tempfile.mkdtemp(prefix="pagedserve-core-")
    os.chmod(directory, 0o700)
    return (f"ipc://{directory}/input",
            [f"ipc://{directory}/output-{i}" for i in range(num_clients)])


def remove_ipc_directory(address: str) -> None:
    """Remove the directory of an ``ipc://`` address and its socket files, if still there."""
    if not address.startswith("ipc://"):
        return
    directory = os.path.dirname(address[len("ipc://"):])
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass
    try:
        os.rmdir(directory)
    except OSError:
        pass
