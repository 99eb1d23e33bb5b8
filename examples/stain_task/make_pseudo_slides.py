"""Stain example, step 2: cut region "pseudo-slides" from the tile grids of an embed run, and write their labels.

Each source slide's tiles are grouped into non-overlapping square regions of ``--region`` grid px (default 256 =
2 x 2 tiles of 128 px at 0.5 µm/px); every region with at least ``--min-tiles`` tiles becomes a pseudo-slide with
its own ``<id>/tile_embeddings.h5`` (the same tile embeddings, coordinates shifted to the region's origin, still in
grid px). Cutting after the embed job embeds every tile once.

``labels.csv``: ``slide_id, patient_id, source_slide, stain, n_tiles``. A "patient" is a pair of vertically
adjacent regions of one source slide, so neighbouring tissue never sits on both sides of a split. Regions of the
same source slide still share the slide's scanner, stain batch and tissue: the task is a demonstration of the
whole path, not a benchmark.

Usage: python make_pseudo_slides.py EMBED_DIR OUT_DIR [--region 256] [--min-tiles 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from gigapath_core.interop import grid_coords_attrs, read_tile_features
from gigapath_core.store import write_bytes, write_h5

#: source slide id (file name without extension) -> stain
STAINS = {"CMU-1-Small-Region": "HE", "OS-1-detail": "HE", "OS-2-ndpi": "IHC"}


def cut_pseudo_slides(embed_dir: str | Path, out_dir: str | Path, region_px: int = 256, min_tiles: int = 2,
                      stains: dict[str, str] = STAINS, patient_rows: int = 2) -> list[dict]:
    """Write one ``tile_embeddings.h5`` per region and ``labels.csv`` into ``out_dir``; return the label rows.

    Raises SystemExit with a message if no source slide of ``stains`` has tile embeddings in ``embed_dir``.
    """
    embed_dir, out_dir = Path(embed_dir), Path(out_dir)
    rows = []
    found = 0
    for source, stain in stains.items():
        path = embed_dir / source / "tile_embeddings.h5"
        if not path.is_file():
            print(f"skipping {source}: no {path}", file=sys.stderr)
            continue
        found += 1
        tf = read_tile_features(path)  # either format version; grid px in tf.grid_coords
        data, attrs = {"features": tf.features, "coords": tf.coords}, tf.attrs
        coords = tf.grid_coords
        region = coords // region_px  # (N, 2) region column, row
        for rc, rr in sorted({tuple(r) for r in region.tolist()}, key=lambda t: (t[1], t[0])):
            keep = np.flatnonzero((region[:, 0] == rc) & (region[:, 1] == rr))  # stays row-major
            if len(keep) < min_tiles:
                continue
            sid = f"{source}_x{rc}_y{rr}"
            origin = np.array([rc * region_px, rr * region_px], dtype=np.int64)
            write_h5(out_dir / sid / "tile_embeddings.h5",
                     {"features": data["features"][keep], "grid_coords": coords[keep] - origin,
                      "coords": (data["coords"] if data["coords"] is not None else coords)[keep]},
                     attrs={**attrs, "format_version": 2, "source_slide": source,
                            "region_origin_grid_px": origin.tolist(), "region_size_grid_px": region_px},
                     dataset_attrs={"grid_coords": grid_coords_attrs(target_mpp=tf.target_mpp, tile_size=tf.tile_size)})
            rows.append({"slide_id": sid, "patient_id": f"{source}_x{rc}_y{rr // patient_rows}",
                         "source_slide": source, "stain": stain, "n_tiles": len(keep)})
    if not found:
        raise SystemExit(f"no tile embeddings of {', '.join(stains)} under {embed_dir}: run the embed step first")
    lines = ["slide_id,patient_id,source_slide,stain,n_tiles"]
    lines += [f"{r['slide_id']},{r['patient_id']},{r['source_slide']},{r['stain']},{r['n_tiles']}" for r in rows]
    write_bytes(out_dir / "labels.csv", ("\n".join(lines) + "\n").encode())
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("embed_dir", help="output folder of the embed step (embed.yaml)")
    p.add_argument("out_dir", help="folder for the pseudo-slides and labels.csv")
    p.add_argument("--region", type=int, default=256, help="region side in grid px at 0.5 µm/px (default 256)")
    p.add_argument("--min-tiles", type=int, default=2, help="drop regions with fewer tiles (default 2)")
    args = p.parse_args(argv)
    rows = cut_pseudo_slides(args.embed_dir, args.out_dir, args.region, args.min_tiles)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["stain"]] = counts.get(r["stain"], 0) + 1
    patients = len({r["patient_id"] for r in rows})
    print(f"{len(rows)} pseudo-slides ({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))}) of "
          f"{patients} patients -> {Path(args.out_dir) / 'labels.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
