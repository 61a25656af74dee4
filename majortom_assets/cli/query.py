"""`majortom search --text ...` and `--image PATH`: query vectors made from words or a picture.

Added to the ``search`` command of cli/vectors.py; the library is `majortom_assets.vectors.query`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from majortom_assets.cli.common import positive_int


def add_query_arguments(group, p: argparse.ArgumentParser) -> None:
    """``group``: the search command's mutually exclusive query group."""
    group.add_argument("--text", action="append", metavar="PROMPT",
                       help="SigLIP models: find fragments matching these words; repeat to average prompts")
    group.add_argument("--image", type=Path, help="GeoTIFF, PNG or JPEG of any size, embedded with the model")
    g = p.add_argument_group("text and image queries")
    g.add_argument("--image-mode", default="mean", choices=["mean", "fragments"],
                   help="one query from the mean of the image's fragments, or one per fragment")
    g.add_argument("--weights", default="pretrained",
                   help="weights of the query model: 'pretrained' (HF/torchgeo cache), 'random', or a "
                        "checkpoint folder/file; must be those that made the embeddings")
    g.add_argument("--tiny", action="store_true", help="tiny random model (tests/demos)")
    g.add_argument("--seed", type=int, default=0, help="seed of random weights")
    g.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the checkpoint's)")
    g.add_argument("--batch-size", type=positive_int, default=16, help="image fragments per forward pass")


def wants_query_model(args) -> bool:
    return bool(getattr(args, "text", None)) or getattr(args, "image", None) is not None


def query_vectors(args, index):
    """(vectors (Q, dim), QueryVectors) for --text / --image; checks dims and weights."""
    from majortom_assets.geoparquet import RANDOM_WEIGHTS_WARNING
    from majortom_assets.vectors import query

    if args.text:
        encoder = query.load_text_encoder(args.model, args.weights, tiny=args.tiny, seed=args.seed,
                                          tokenizer=args.tokenizer)
        qv = query.text_query(args.text, encoder)
    else:
        from majortom_assets.models import load_embedder

        embedder = load_embedder(args.model, args.weights, tiny=args.tiny, seed=args.seed)
        qv = query.image_query(args.image, embedder, mode=args.image_mode, batch_size=args.batch_size)
    if qv.vectors.shape[1] != index.dim:
        raise ValueError(f"the query model gives {qv.vectors.shape[1]}-d vectors but the index holds {index.dim}-d "
                         f"ones: use the weights that made the embeddings (--weights, --tiny)")
    sources = [s["path"] for s in index.manifest.get("sources", [])]
    what = ", ".join(qv.labels) if len(qv.labels) <= 3 else f"{len(qv.labels)} fragments"
    flag = ", RANDOM WEIGHTS" if qv.random_weights else ""
    lines = [f"query: {what} (weights {qv.weights_name}{flag})"]
    lines += [f"  {n}" for n in qv.notes]
    if qv.random_weights:
        lines.append(f"WARNING: the query model has random weights: {RANDOM_WEIGHTS_WARNING}")
    lines += [f"WARNING: {w}" for w in query.check_weights(qv, sources)]
    stream = sys.stderr if args.format == "json" else sys.stdout
    for line in lines:
        print(line, file=stream)
    return qv.vectors, qv
