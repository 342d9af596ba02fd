"""Tables of a bench result: plain text for the console, Markdown for the README (bench.md)."""

from __future__ import annotations

from typing import Any


def _train_rows(result: dict[str, Any]) -> list[list[str]]:
    return [
        [
            row["scale"],
            row["route"],
            row["dtype"],
            row["source"],
            row["runner"],
            f"{row['samples_per_s']:.1f}",
            f"{1000 * row['step_s']:.0f}",
            f"{row['peak_memory_mib']:.0f}",
            f"{row.get('added_memory_mib', float('nan')):.0f}",
            f"{row['flops_per_sample'] / 1e9:.2f}",
            f"{row['mfu']:.3f}",
        ]
        for row in result["train"]["rows"]
    ]


TRAIN_HEADER = [
    "scale",
    "route",
    "dtype",
    "input",
    "runner",
    "samples/s",
    "step ms",
    "peak MiB",
    "added MiB",
    "GFLOP/sample",
    "MFU",
]
DECODE_HEADER = ["model", "strategy", "decoding", "tokens/s", "images/s"]


def _decode_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for model, section in result["decode"].get("models", {}).items():
        for row in section["rows"]:
            rows.append(
                [
                    model,
                    row["strategy"],
                    row["decoding"],
                    f"{row['tokens_per_s']:.0f}",
                    f"{row['images_per_s']:.2f}",
                ]
            )
    return rows


def _data_rows(result: dict[str, Any], section: str = "data") -> tuple[list[str], list[list[str]]]:
    by_scale = result[section]["by_scale"]
    workers = sorted({w for entry in by_scale.values() for w in entry["images_per_s_by_workers"]}, key=int)
    header = ["tower input", *[f"{w} workers img/s" for w in workers]]
    rows = [
        [
            f"{entry['image_size']} px ({scale})",
            *[f"{entry['images_per_s_by_workers'].get(w, 0):.0f}" for w in workers],
        ]
        for scale, entry in by_scale.items()
    ]
    return header, rows


def headline(result: dict[str, Any]) -> list[tuple[str, str]]:
    items = []
    if "train" in result:
        t = result["train"]
        for key, digits in (
            ("vgtrain_vs_loop", 3),
            ("vgtrain_vs_loop_cpu_time", 3),
            ("vgtrain_vs_loop_fastest_step", 3),
            ("cached_vs_images", 2),
            ("cached_vs_images_tiny_lm", 2),
            ("mfu", 3),
            ("best_mfu", 3),
            ("wait_fraction", 3),
        ):
            if t.get(key) is not None:
                items.append((f"train.{key}", f"{t[key]:.{digits}f}"))
        for dtype, entry in t.get("clipcap", {}).items():  # each precision's ratio (the first is above)
            items.append((f"train.vgtrain_vs_loop ({dtype})", f"{entry['vgtrain_vs_loop']:.3f}"))
        for batch, entry in (t.get("gpu_by_batch") or {}).items():
            items.append(
                (
                    f"train.prefix_samples_per_s (batch {batch})",
                    f"{entry['prefix_samples_per_s']:.0f} (loop {entry['loop_samples_per_s']:.0f}, "
                    f"xattn {entry['xattn_samples_per_s']:.0f})",
                )
            )
    if "decode" in result:
        for model, speedup in result["decode"]["kv_cache_speedup_by_model"].items():
            items.append((f"decode.kv_cache_speedup ({model})", f"{speedup:.2f}"))
        for model, rate in result["decode"].get("greedy_tokens_per_s_by_model", {}).items():
            items.append((f"decode.greedy_tokens_per_s ({model})", f"{rate:.0f}"))
    if "data" in result:
        items.append(("data.images_per_s", f"{result['data']['images_per_s']:.0f}"))
    if "cache" in result:
        items.append(("cache.images_per_s", f"{result['cache']['images_per_s']:.0f}"))
    return items


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def sections(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    out = [("headline", ["key", "value"], [list(item) for item in headline(result)])]
    if "train" in result:
        out.append(("training step", TRAIN_HEADER, _train_rows(result)))
    if "data" in result:
        header, rows = _data_rows(result)
        out.append(("data pipeline (decode + transform + tokenise + collate)", header, rows))
    if "decode" in result:
        out.append(("decoding", DECODE_HEADER, _decode_rows(result)))
    if "cache" in result:
        header, rows = _data_rows(result, "cache")
        out.append((f"feature caching (vgtrain cache on {result['cache']['device']})", header, rows))
    return out


def render_text(result: dict[str, Any]) -> str:
    return "\n\n".join(f"{title}\n{text_table(header, rows)}" for title, header, rows in sections(result))


def render_markdown(result: dict[str, Any]) -> str:
    machine = result["machine"]
    intro = (
        f"Measured on {machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch threads, "
        f"torch {machine['torch']}, device {machine['device']}; size `{result['size']}`, "
        f"{result['wall_s']:.0f} s. Command: `{result['command']}`."
    )
    body = "\n\n".join(
        f"**{title}**\n\n{markdown_table(header, rows)}" for title, header, rows in sections(result)
    )
    return f"{intro}\n\n{body}\n"
