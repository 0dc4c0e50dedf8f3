"""`archipelago data put PATH`: upload a user's dataset to the coordinator's store.

The file is read and converted here (`opdag.data.formats`), every check made before the
network; then the coordinator is asked which of the dataset's content-addressed chunks it
lacks (a dataset over its size bound is refused at that question, before a byte is sent),
those are sent one by one (progress on stderr), and the manifest last: only then does the
name point at the new content. Putting the same content again sends no chunk.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from archipelago.client import ClientError, CoordinatorClient
from archipelago.credential_args import add_operator_arg, operator_token
from archipelago.errors import UsageError
from archipelago.tls_args import add_client_tls_args, client_tls
from opdag.data.formats import FORMAT_NAMES, Prepared, describe, read_dataset
from opdag.data.manifest import CHUNK_BYTES

# Progress lines are written for datasets of more chunks than this.
PROGRESS_CHUNKS = 2


def add_data_cache_arg(p: argparse.ArgumentParser) -> None:
    """The worker's option for where it caches dataset chunks."""
    p.add_argument(
        "--data-cache",
        type=Path,
        default=None,
        metavar="DIR",
        help="where the chunks of users' datasets are cached (default: "
        "$ARCHIPELAGO_DATA_CACHE or ~/.cache/archipelago/datasets)",
    )


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    """`data put`, with the coordinator, operator token and TLS options of every user's
    command."""
    from archipelago.servicecmds import _coordinator_arg

    p = sub.add_parser("data", help="users' own datasets in the coordinator's store")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data_sub.add_parser("put", help="upload a dataset; prints its name and sha256")
    p.add_argument("path", help="a text, .jsonl, .npy, .bin (uint16) or .npz file")
    p.add_argument("--name", default=None, help="the dataset's name (default: the file's stem)")
    p.add_argument("--format", default=None, choices=FORMAT_NAMES, help="(default: by suffix)")
    p.add_argument("--text-field", default="text", help="jsonl: the field holding the text")
    p.add_argument("--tokenizer", default=None, help="a `tokenizers` tokenizer.json file")
    p.add_argument("--vocab", type=int, default=None, help="npy/bin: the vocab (default: max+1)")
    p.add_argument(
        "--rename",
        default="",
        metavar="OLD=NEW[,OLD=NEW]",
        help="store arrays (or a token dataset's tokens/targets) under the model's input names",
    )
    _coordinator_arg(p)
    add_operator_arg(p)
    add_client_tls_args(p)
    p.set_defaults(func=cmd_data_put)


def _renames(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        old, eq, new = item.partition("=")
        if not eq or not old or not new:
            raise UsageError(f"--rename {item!r} is not OLD=NEW")
        out[old] = new
    return out


def upload(client: CoordinatorClient, prepared: Prepared, *, progress: bool) -> tuple[str, str]:
    """Send the chunks the coordinator lacks, then the manifest; (name, sha256)."""
    m = prepared.manifest
    total = m.total_bytes
    missing = set(client.missing_dataset_chunks(total, [sha for sha, _ in m.chunks]))
    sent = 0
    for index, (sha, _) in enumerate(m.chunks):
        if sha not in missing:
            continue
        missing.discard(sha)  # a chunk repeated in the stream is sent once
        data = prepared.stream[index * CHUNK_BYTES : (index + 1) * CHUNK_BYTES]
        client.put_dataset_chunk(sha, data, total)
        sent += 1
        if progress:
            print(
                f"\rsent chunk {index + 1}/{len(m.chunks)} ({sent} new)",
                end="",
                file=sys.stderr,
                flush=True,
            )
    if progress:
        print(file=sys.stderr)
    print(f"{sent} of {len(m.chunks)} chunks sent (the rest were stored)", file=sys.stderr)
    return client.put_dataset(m.to_json())


def cmd_data_put(args: argparse.Namespace) -> int:
    prepared = read_dataset(
        Path(args.path),
        name=args.name,
        fmt=args.format,
        text_field=args.text_field,
        tokenizer=args.tokenizer,
        vocab=args.vocab,
        rename=_renames(args.rename),
    )
    print(f"{prepared.manifest.name}: {describe(prepared.manifest)}", file=sys.stderr)
    client = CoordinatorClient(
        args.coordinator, operator_token=operator_token(args), tls=client_tls(args)
    )
    try:
        progress = len(prepared.manifest.chunks) > PROGRESS_CHUNKS
        name, sha = upload(client, prepared, progress=progress)
    except ClientError as e:
        raise UsageError(str(e)) from None
    finally:
        client.close()
    print(f"{name} {sha}")
    return 0
