"""PNG plots from benchmark records: decode ms/token per backend, and against context length."""

from __future__ import annotations

from pathlib import Path


def plot_records(records: list[dict], stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    shortest = min(r["prompt_tokens"] for r in records)
    threads = max(r["threads"] for r in records)
    head = [r for r in records if r["prompt_tokens"] == shortest and r["threads"] == threads]
    head.sort(key=lambda r: r["decode_ms_median"])
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(head) + 1.5))
    labels = [f"{r['backend']} {r['precision']}" for r in head]
    ax.barh(labels, [r["decode_ms_median"] for r in head], xerr=[[r["decode_ms_median"] - r["decode_ms_pass_spread"][0] for r in head],
                                                                [r["decode_ms_pass_spread"][1] - r["decode_ms_median"] for r in head]], color="#4c72b0")
    for r, y in zip(head, range(len(head))):
        ax.plot([r["floor_ms"]] * 2, [y - 0.4, y + 0.4], color="#c44e52", lw=2)
    ax.invert_yaxis()
    ax.set_xlabel("decode ms/token (median; bars: spread of pass medians; red: memory-bandwidth floor)")
    ax.set_title(f"{head[0]['model']}: prompt {shortest}, {head[0]['new_tokens']} new tokens, {threads} threads", fontsize=9)
    fig.tight_layout()
    paths.append(stem.with_name(stem.name + "_decode.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    contexts = sorted({r["prompt_tokens"] for r in records})
    if len(contexts) > 1:
        fig, ax = plt.subplots(figsize=(8.5, 4))
        for key in sorted({(r["backend"], r["precision"]) for r in records}):
            rows = sorted((r for r in records if (r["backend"], r["precision"]) == key and r["threads"] == threads), key=lambda r: r["prompt_tokens"])
            ax.plot([r["prompt_tokens"] for r in rows], [r["decode_ms_median"] for r in rows], "o-", label=" ".join(key))
        ax.set_xlabel("context (prompt tokens)")
        ax.set_ylabel("decode ms/token (median)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # outside: lines of many peers run under it
        ax.set_title(f"{records[0]['model']}: decode cost against context, {threads} threads", fontsize=9)
        fig.tight_layout()
        paths.append(stem.with_name(stem.name + "_context.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


if __name__ == "__main__":  # redraw from a results JSON: python -m dialogpt_edge.benchmarks.plot FILE.json
    import json
    import sys

    source = Path(sys.argv[1])
    print(plot_records(json.loads(source.read_text())["records"], source.with_suffix("")))
