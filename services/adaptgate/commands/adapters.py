"""`adaptgate adapters …`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adaptgate.client import Client
from adaptgate.v1 import adapters_pb2


def print_adapter(adapter: adapters_pb2.Adapter) -> None:
    aliases = ",".join(adapter.aliases) or "-"
    state = "pinned" if adapter.pinned else "loaded" if adapter.loaded else "on disk"
    print(f"{adapter.ref:32} aliases={aliases:10} rank={adapter.rank:<3} labels={len(adapter.labels):<3} {state}  {adapter.source}")


def run_adapters_command(client: Client, args: argparse.Namespace) -> None:
    md = client.metadata
    if args.action == "list":
        for adapter in client.adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(), metadata=md).adapters:
            print_adapter(adapter)
        return
    if not args.ref:
        sys.exit(f"adapters {args.action} needs an adapter reference (or a directory for upload)")
    if args.action == "upload":
        directory = Path(args.ref)
        print_adapter(client.upload_adapter(directory, args.name or directory.name.lower(), args.alias))
        return
    ref = adapters_pb2.AdapterRef(ref=args.ref)
    if args.action == "delete":
        deleted = client.delete_adapter(args.ref, force=args.force)
        removed = f" (aliases removed: {', '.join(deleted.aliases_removed)})" if deleted.aliases_removed else ""
        print(f"deleted {', '.join(deleted.deleted)}{removed}")
    elif args.action == "alias":
        if not args.alias:
            sys.exit("adapters alias needs --alias")
        print_adapter(client.adapters.SetAlias(adapters_pb2.SetAliasRequest(ref=args.ref, alias=args.alias), metadata=md))
    elif args.action == "load":
        print_adapter(client.adapters.LoadAdapter(adapters_pb2.LoadAdapterRequest(ref=args.ref, pin=args.pin), metadata=md))
    else:
        method = {"get": client.adapters.GetAdapter, "unload": client.adapters.UnloadAdapter}
        print_adapter(method[args.action](ref, metadata=md))
