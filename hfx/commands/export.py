"""``hfx export``: write a model folder that loads with ``trust_remote_code=True`` on a machine without hfx."""

from __future__ import annotations

import argparse

HELP = "write a self-contained copy of a model (its code and plugins included) that loads without hfx"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help=HELP,
        description="Copy MODEL_DIR's model into OUT_DIR together with the code it runs: hfx's model and config "
        "modules and exactly the plugins its config names (norm, positions, feed-forward, attention; third-party "
        "ones too), flattened into the folder with their imports rewritten, and an auto_map in config.json. "
        "AutoModel*.from_pretrained(OUT_DIR, trust_remote_code=True) then works where hfx is not installed. "
        "Also written: weights (safetensors), generation config, the tokenizer files MODEL_DIR has, README.md "
        "(a model card: architecture, every setting, parameter count, training run if recorded) and "
        "hfx_export.json (what came from where).",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="folder of a saved hfx model (config.json + weights)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="new or empty folder to write the export to")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export (a folder with hfx_export.json holding only the files it "
                        "lists); any other non-empty folder is refused")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hfx.commands import usage_error
    from hfx.export import ExportError, export_model

    try:  # export_model checks both folders before it imports torch
        result = export_model(Path(args.model_dir), Path(args.out_dir), overwrite=args.overwrite)
    except ExportError as exc:
        usage_error("export", str(exc))
    components = ", ".join(f"{c.kind}={c.name}" for c in result.components) or "none"
    print(f"wrote {result.out_dir}: {result.architecture}, {result.num_parameters:,} parameters, components: "
          f"{components}; {len(result.files)} files ({', '.join(result.files)})")
    loader = next(a for a, target in result.auto_map.items() if target.endswith("." + result.architecture))
    print(f"load it with {loader}.from_pretrained({str(result.out_dir)!r}, trust_remote_code=True)")
    return 0
