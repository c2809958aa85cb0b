"""jee1-convert throughput and memory on a synthetic >= 1 GB Llama checkpoint with a rank-64 adapter.

Prints, per phase (merge+write, quantize): wall time, MB/s of input, peak RSS of that phase; and
the two ratios the converter is held to, against baselines measured in this same run:
  * peak RSS of merge+write  <=  4 x largest tensor in float32 + 500 MB
  * merge+write MB/s         >=  0.5 x a plain copy of the same shard bytes (read + write)
and the cost of ``--qlora-base nf4`` (the bitsandbytes round trip before the merge): its
merge+write throughput and peak RSS against the plain merge of the same checkpoint, same run.

    python benchmarks/convert_bench.py [--workdir DIR] [--layers N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


from jee1.convert.bnb4 import QloraBase
from jee1.convert.pipeline import ConvertOptions, convert
from jee1.convert.quant_types import quant_type
from jee1.convert.tiny import AdapterSpec, TinySpec, build_adapter, build_checkpoint, train_tokenizer

MB = 1e6


def plain_copy_mb_per_s(files: list[Path], dest: Path) -> float:
    """Read every shard and write it out again, 8 MiB at a time: the I/O a streaming converter does
    (into the page cache, like the converter's F16 intermediate; neither is fsync'ed)."""
    total = 0
    start = time.perf_counter()
    with open(dest, "wb") as out:
        for path in files:
            with open(path, "rb") as f:
                while chunk := f.read(8 * 1024 * 1024):
                    out.write(chunk)
                    total += len(chunk)
    seconds = time.perf_counter() - start
    dest.unlink()
    return total / MB / seconds


def settle() -> None:
    """Write back dirty pages so each timed run starts from the same I/O state."""
    os.sync()
    time.sleep(0.5)


def depth_check(args) -> int:
    """Peak RSS of every phase of a Q4_K_M conversion (rank-64 adapter on all seven projections) at
    24 and at 48 layers, same width: what stays resident must not grow with the model's depth."""
    work = Path(args.workdir or tempfile.mkdtemp(prefix="jee1-depth-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    peaks = {}
    try:
        tokenizer = train_tokenizer(work, 512)
        for layers in (24, 48):
            spec = TinySpec(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=8,
                            num_key_value_heads=2, vocab_size=512, shards=4)
            base = build_checkpoint(work / f"base{layers}", spec, tokenizer=tokenizer)
            adapter = build_adapter(work / f"adapter{layers}", spec, AdapterSpec(rank=64, alpha=16))
            settle()
            result = convert(ConvertOptions(base_dir=base, adapter_dir=adapter, output=work / f"d{layers}.gguf",
                                            quant=quant_type("Q4_K_M"), threads=args.threads, quiet=True))
            peaks[layers] = {name: phase.peak_rss for name, phase in result.phases.items()}
            shutil.rmtree(base)
            result.output.unlink()
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    ratios = {name: round(peaks[48][name] / peaks[24][name], 3) for name in peaks[24]}
    ok = all(r <= 1.10 for r in ratios.values())
    if args.json:
        print(json.dumps({"peak_rss_bytes": peaks, "ratio_48_vs_24": ratios, "target_met": ok}, indent=2))
    else:
        print(f"{'phase':<14} {'24 layers':>10} {'48 layers':>10} {'ratio':>7}  (target <= 1.10)")
        for name in peaks[24]:
            print(f"{name:<14} {peaks[24][name] / MB:>8.1f}MB {peaks[48][name] / MB:>8.1f}MB {ratios[name]:>7.3f}")
        print("met" if ok else "MISSED")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a temporary one, removed)")
    parser.add_argument("--layers", type=int, default=12, help="transformer blocks (12 gives ~1.1 GB)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=5,
                        help="interleaved copy / merge+write runs; medians are reported (this VM's I/O is noisy)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--depth", action="store_true",
                        help="only the depth check: peak RSS of every phase at 24 and 48 layers (target <= 1.10x)")
    args = parser.parse_args()
    if args.depth:
        return depth_check(args)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="jee1-convert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        spec = TinySpec(hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers,
                        num_attention_heads=16, num_key_value_heads=4, vocab_size=512, shards=6)
        print(f"building a synthetic checkpoint ({args.layers} layers, hidden 2048) in {work} ...", file=sys.stderr)
        tokenizer = train_tokenizer(work, spec.vocab_size)
        base = build_checkpoint(work / "base", spec, tokenizer=tokenizer)
        adapter = build_adapter(work / "adapter", spec, AdapterSpec(rank=64, alpha=16))
        shards = sorted(base.glob("*.safetensors"))
        checkpoint_bytes = sum(p.stat().st_size for p in shards)
        largest_f32 = max(spec.intermediate_size * spec.hidden_size, spec.vocab_size * spec.hidden_size) * 4

        copies, merges, base_only, qlora = [], [], [], []
        for _ in range(args.repeats):
            settle()
            copies.append(plain_copy_mb_per_s(shards, work / "copy.bin"))
            for adapter_dir, runs, qlora_base in ((adapter, merges, None), (None, base_only, None),
                                                  (adapter, qlora, QloraBase("nf4", "bf16", 64, True))):
                settle()
                f16 = convert(ConvertOptions(base_dir=base, adapter_dir=adapter_dir, output=work / "bench.F16.gguf",
                                             quant=quant_type("F16"), threads=args.threads, quiet=True,
                                             qlora_base=qlora_base))
                runs.append(f16.phases["merge+write"])
                f16.output.unlink()
        settle()
        result = convert(ConvertOptions(base_dir=base, adapter_dir=adapter, output=work / "bench.Q4_K_M.gguf",
                                        quant=quant_type("Q4_K_M"), threads=args.threads, quiet=True))
        copy_mb_s = statistics.median(copies)
        merge = sorted(merges, key=lambda m: m.mb_per_s)[len(merges) // 2]
        merge.peak_rss = max(m.peak_rss or 0 for m in merges + [result.phases["merge+write"]])
        quant = result.phases["quantize"]
        base_only_mb_s = statistics.median(m.mb_per_s for m in base_only)
        qlora_mb_s = statistics.median(m.mb_per_s for m in qlora)
        qlora_rss = max(m.peak_rss or 0 for m in qlora)
        rss_limit = 4 * largest_f32 + 500 * 2**20
        figures = {
            "checkpoint_bytes": checkpoint_bytes,
            "adapter": "rank 64 on q,k,v,o,gate,up,down",
            "largest_tensor_f32_bytes": largest_f32,
            "plain_copy_mb_per_s": round(copy_mb_s, 1),
            "runs": {"copy_mb_per_s": [round(c, 1) for c in copies],
                     "merge_write_mb_per_s": [round(m.mb_per_s, 1) for m in merges]},
            "merge_write": {"seconds": round(merge.seconds, 2), "mb_per_s": round(merge.mb_per_s, 1),
                            "peak_rss_bytes": merge.peak_rss},
            "write_without_adapter_mb_per_s": round(base_only_mb_s, 1),
            "ratio_write_without_adapter_vs_copy": round(base_only_mb_s / copy_mb_s, 3),
            "qlora_nf4_merge_write": {"mb_per_s": round(qlora_mb_s, 1), "peak_rss_bytes": qlora_rss,
                                      "runs_mb_per_s": [round(m.mb_per_s, 1) for m in qlora]},
            "ratio_qlora_vs_plain_merge_throughput": round(qlora_mb_s / statistics.median(m.mb_per_s for m in merges), 3),
            "ratio_qlora_vs_plain_merge_peak_rss": round(qlora_rss / merge.peak_rss, 3) if merge.peak_rss else None,
            "ratio_qlora_peak_rss_vs_limit": round(qlora_rss / rss_limit, 3),
            "quantize": {"seconds": round(quant.seconds, 2), "mb_per_s": round(quant.mb_per_s, 1),
                         "peak_rss_bytes": quant.peak_rss, "threads": args.threads},
            "output_bytes": result.output.stat().st_size,
            "ratio_merge_throughput_vs_copy": round(merge.mb_per_s / copy_mb_s, 3),
            "ratio_merge_peak_rss_vs_limit": round(merge.peak_rss / rss_limit, 3) if merge.peak_rss else None,
        }
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    ok_rss = (figures["ratio_merge_peak_rss_vs_limit"] is not None and figures["ratio_merge_peak_rss_vs_limit"] <= 1
              and figures["ratio_qlora_peak_rss_vs_limit"] <= 1)
    ok_speed = figures["ratio_merge_throughput_vs_copy"] >= 0.5
    if args.json:
        print(json.dumps(figures | {"rss_target_met": ok_rss, "throughput_target_met": ok_speed}, indent=2))
    else:
        m, q = figures["merge_write"], figures["quantize"]
        print(f"checkpoint            {checkpoint_bytes / MB:9.1f} MB fp16, {figures['adapter']}")
        print(f"largest tensor (f32)  {largest_f32 / MB:9.1f} MB")
        print(f"plain copy            {copy_mb_s:9.1f} MB/s  (baseline, same run; median of "
              f"{figures['runs']['copy_mb_per_s']})")
        print(f"merge+write           {m['mb_per_s']:9.1f} MB/s  {m['seconds']:7.2f} s  peak RSS {m['peak_rss_bytes'] / MB:7.1f} MB"
              f"  (median of {figures['runs']['merge_write_mb_per_s']})")
        print(f"write, no adapter     {base_only_mb_s:9.1f} MB/s  (median; the streaming path without B @ A)")
        ql = figures["qlora_nf4_merge_write"]
        print(f"merge+write, qlora nf4{ql['mb_per_s']:9.1f} MB/s  peak RSS {ql['peak_rss_bytes'] / MB:7.1f} MB"
              f"  (median of {ql['runs_mb_per_s']}; --qlora-base nf4, bf16, double quant)")
        print(f"quantize (Q4_K_M)     {q['mb_per_s']:9.1f} MB/s  {q['seconds']:7.2f} s  peak RSS {q['peak_rss_bytes'] / MB:7.1f} MB"
              f"  ({args.threads} threads)")
        print(f"output                {figures['output_bytes'] / MB:9.1f} MB")
        print(f"merge+write / copy throughput   {figures['ratio_merge_throughput_vs_copy']:.3f}  (target >= 0.5)  "
              f"{'met' if ok_speed else 'MISSED'}")
        print(f"no-adapter write / copy         {figures['ratio_write_without_adapter_vs_copy']:.3f}")
        print(f"qlora nf4 / plain merge         throughput {figures['ratio_qlora_vs_plain_merge_throughput']:.3f}, "
              f"peak RSS {figures['ratio_qlora_vs_plain_merge_peak_rss']:.3f}, "
              f"peak RSS / limit {figures['ratio_qlora_peak_rss_vs_limit']:.3f}")
        print(f"merge+write peak RSS / limit    {figures['ratio_merge_peak_rss_vs_limit']:.3f}  "
              f"(limit 4 x {largest_f32 / MB:.1f} MB + 500 MB = {rss_limit / MB:.0f} MB)  {'met' if ok_rss else 'MISSED'}")
    return 0 if ok_rss and ok_speed else 1


if __name__ == "__main__":
    sys.exit(main())
