"""The serving benchmark's printed table and its plot (tokens/s against batch size)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _f(value: Any, fmt: str = ".2f") -> str:
    return format(value, fmt) if isinstance(value, int | float) else str(value)


def table(r: dict[str, Any]) -> str:
    m = r["meta"]
    lines = [
        f"serving benchmark  {m['device']}  {m['date']}  {m['model']} {m['dtype']}  graphs={m['cuda_graphs']}",
        f"copy bandwidth (read+write): {_f(r['copy_bandwidth_GBps'], '.0f')} GB/s",
    ]
    a = r.get("a", {})
    if "rows" in a:
        lines.append("a) decode   B  forward_ms  roofline_ms  fwd/roof  step_ms  tok/s  (eager step_ms)")
        for row in a["rows"]:
            eager = a.get("eager_rows", {}).get(str(row["batch"]))
            lines.append(
                f"          {row['batch']:4d}  {row['forward_ms']:9.3f}  {row['roofline_ms']:10.3f}  "
                f"{row['forward_over_roofline']:7.2f}  {row['step_ms']:7.3f}  {row['tokens_per_s']:7.0f}"
                + (f"  ({eager['step_ms']:.3f}, fwd {eager['forward_ms']:.3f})" if eager else "")
            )
    b = r.get("b", {})
    if "base" in b:
        rows = [(key, b[key]) for key in ("base", "qkvo", "all_seven")]
        rows += [(f"qkvo {key}", row) for key, row in b.get("ablations", {}).items()]
        for key, row in rows:
            lines.append(
                f"b) B={row['batch']} {key:18s} adapters={row['adapters']:3d} fwd {row['forward_ms']:.3f} ms "
                f"roof {row['roofline_ms']:.3f} ms ({row['forward_over_roofline']:.2f}x)  "
                f"{row['tokens_per_s']:.0f} tok/s, ahead {_f(row.get('steps_ahead_share'))}"
            )
        lines.append(
            f"b) qkvo/base throughput {b['qkvo_over_base_throughput']:.3f} (forward {b['qkvo_over_base_forward']:.3f}); "
            f"all-seven fwd/roofline {b['all_seven_forward_over_roofline']:.2f}; graph vs eager rel err "
            f"{_f(b['qkvo'].get('graph_vs_eager_rel_err'), '.2e')}"
        )
    c = r.get("c", {})
    if "speedup_mixed" in c:
        lines.append(
            f"c) B={c['batch']} prompt {c['prompt']} new {c['new_tokens']}: HF base {c['hf_base_tokens_per_s']:.0f}, "
            f"HF 1 adapter {c['hf_one_adapter_tokens_per_s']:.0f}, HF {c['adapters']} mixed "
            f"{c['hf_mixed_tokens_per_s']:.0f} | ours base {c['ours_base_tokens_per_s']:.0f}, ours mixed "
            f"{c['ours_mixed_tokens_per_s']:.0f} tok/s -> {c['speedup_mixed']:.1f}x"
        )
        lines.append(
            f"c) oracle: prefill logits rel err {c['check_prefill_logits_rel_err']:.2e}, greedy tokens equal "
            f"{c['check_greedy_tokens_equal']:.2f}, first tokens equal {c['check_first_token_equal']:.2f}; "
            f"async = sync tokens {c.get('check_async_tokens_equal_sync')} (logits rel err "
            f"{_f(c.get('check_async_vs_sync_logits_rel_err'), '.1e')}); sync run repeated: tokens "
            f"{c.get('check_sync_repeat_tokens_equal')} (logits rel err "
            f"{_f(c.get('check_sync_repeat_logits_rel_err'), '.1e')})"
        )
    d = r.get("d", {})
    if "warm_over_cold" in d:
        lines.append(
            f"d) prefix {d['system_tokens']}+{d['question_tokens']}: cold {d['cold_ttft_ms']:.1f} ms, warm "
            f"{d['warm_ttft_ms']:.1f} ms -> {d['warm_over_cold']:.3f}; other tenant same prompt "
            f"{d['other_tenant_same_prompt_ttft_ms']:.1f} ms"
        )
    e = r.get("e", {})
    if "throughput_ratio" in e:
        cap = e["base_capacity"]
        lines.append(
            f"e) {e['registered_adapters']} adapters/{e['gpu_slots']} slots/{e['cpu_tier']} CPU, "
            f"{e['distinct_adapters_used']} used; base capacity {cap['tokens_per_s']:.0f} tok/s = "
            f"{cap['requests_per_s']:.1f} req/s; page cache: {e['page_cache']}"
        )
        runs = [
            (f"cold {e['rate_per_s']:g}/s", e["lora"], e["base"]),
            (f"warm {e['rate_per_s']:g}/s", e["warm"], e["base"]),
            (f"sat {e['sat']['rate_per_s']:.1f}/s", e["sat"]["lora"], e["sat"]["base"]),
        ]
        for name, x, base in runs:
            split = "  ".join(f"{k} {v['p50_ms']:.0f}/{v['p99_ms']:.0f}" for k, v in x["ttft_split"].items())
            lines.append(
                f"e) {name:12s} {x['tokens_per_s']:.0f} tok/s vs base {base['tokens_per_s']:.0f} -> "
                f"{x['tokens_per_s'] / base['tokens_per_s']:.3f}; TTFT p50/p99 {x['ttft_p50_ms']:.0f}/"
                f"{x['ttft_p99_ms']:.0f} ms (base {base['ttft_p50_ms']:.0f}/{base['ttft_p99_ms']:.0f}); "
                f"step {x['step_ms_mean']:.1f} ms (p99 {x['step_ms_p99']:.1f}), running {x['running_mean']:.0f}, "
                f"waiting {x['waiting_mean']:.0f}"
            )
            lines.append(f"e)   TTFT split p50/p99 ms: {split}")
            tc = x["triton_compiles"]
            slow = "  ".join(
                f"{st['ms']:.0f} ms at {st['at_s']:.1f} s ({len(st['compiles'])} compiles)"
                for st in x["slowest_steps"]
            )
            lines.append(f"e)   Triton compiles {tc['count']} ({tc['seconds']:.2f} s); slowest steps: {slow}")
        for name, table_ in (("idle", e["idle_load_stages"]), ("cold", e["lora"]["load_stages"]),
                             ("sat", e["sat"]["lora"]["load_stages"])):  # fmt: skip
            cells = "  ".join(
                f"{k} {v['median_ms']:.1f}"
                + (f"/cpu {v['cpu_median_ms']:.1f}" if v.get("cpu_median_ms") else "")
                for k, v in table_.items()
                if isinstance(v, dict) and "median_ms" in v
            )
            lines.append(f"e) load stages {name} ({table_['loads']} loads), median ms: {cells}")
    f = r.get("f", {})
    if "cpu_to_gpu_ms" in f:
        lines.append(
            f"f) adapter {f['adapter_bytes'] / 1e6:.1f} MB: disk->GPU {f['disk_to_gpu_ms']:.1f} ms, disk->CPU "
            f"{f['disk_to_cpu_ms']:.1f} ms, CPU->GPU {f['cpu_to_gpu_ms']:.2f} ms ({f['cpu_to_gpu_GBps']:.1f} GB/s)"
        )
    if "s3_to_gpu_ms" in f:
        lines.append(
            f"f) S3 ({f['s3']}) -> GPU {f['s3_to_gpu_ms']:.1f} ms = download to the disk cache "
            f"{f['s3_download_ms']:.1f} ms ({f['s3_download_MBps']:.0f} MB/s) + cache folder -> GPU "
            f"{f['s3_cache_to_gpu_ms']:.1f} ms"
        )
    elif "s3" in f:
        lines.append(f"f) S3 -> GPU: {f['s3']}")
    g = r.get("g", {})
    for batch, row in g.get("unfused_rows", {}).items():
        if not isinstance(row, dict):
            continue
        lines.append(
            f"g) unfused elementwise (plain torch), B={batch}: forward {row['forward_ms']:.3f} ms "
            f"({row['forward_over_roofline']:.2f}x roofline), step {row['step_ms']:.3f} ms"
        )
    from benchmarks.serving_profile import report

    lines.extend(report(r.get("p", {})))
    for name in "abcdefgp":
        if "error" in r.get(name, {}):
            lines.append(f"{name}) ERROR {r[name]['error']}")
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = r.get("a", {}).get("rows", [])
    if rows:
        xs = [row["batch"] for row in rows]
        ax.plot(xs, [row["tokens_per_s"] for row in rows], "o-", label="loraplex decode (base)")
        ax.plot(
            xs, [row["roofline_tokens_per_s"] for row in rows], "k--", label="HBM roofline (weights + KV)"
        )
        eager = r["a"].get("eager_rows", {})
        if eager:
            ex = sorted(int(k) for k in eager)
            ax.plot(ex, [eager[str(x)]["tokens_per_s"] for x in ex], "x:", label="loraplex, CUDA graphs off")
    b = r.get("b", {})
    if "qkvo" in b:
        ax.plot(
            [b["qkvo"]["batch"]], [b["qkvo"]["tokens_per_s"]], "s", label="loraplex, 64 distinct adapters"
        )
    c = r.get("c", {})
    if "hf_mixed_tokens_per_s" in c:
        ax.plot(
            [c["batch"]], [c["ours_mixed_tokens_per_s"]], "D", label=f"loraplex, {c['adapters']} mixed (e2e)"
        )
        ax.plot(
            [c["batch"]], [c["hf_mixed_tokens_per_s"]], "v", label=f"transformers+PEFT, {c['adapters']} mixed"
        )
        ax.plot([c["batch"]], [c["hf_base_tokens_per_s"]], "^", label="transformers, no LoRA")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel("output tokens/s")
    m = r["meta"]
    ax.set_title(f"{m['model']}, {m['dtype']} — {m['device']}, {m['date']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
