"""The UI link: codec speed (Python and C), and answers streamed over a real pty through the bridge.

1. Codec: MB/s of payload encoded and decoded by the Python codec and by the C codec (built here
   and measured in C: benchmarks/codec_bench.c), 1 KiB payloads.
2. Link: the tiny model answering through ``jee1 serve``'s bridge over a pty, received by the
   reference UI client; answer tokens/s and the latency the bridge adds per chunk (text produced by
   the engine -> text decoded by the UI, same clock), next to the engine's own tokens/s.  A pty
   carries bytes as fast as the kernel copies them whatever its baud setting, so each baud rate is
   also run with the bridge's writes paced at the UART's 10 bits per byte (8N1): that is the
   figure for a real 115200 / 921600 line.

    python benchmarks/bridge_bench.py [--questions N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from jee1.convert.pipeline import ConvertOptions, convert  # noqa: E402
from jee1.convert.quant_types import quant_type  # noqa: E402
from jee1.convert.tiny import AdapterSpec, TinySpec, build_adapter, build_checkpoint  # noqa: E402
from jee1.edge.engine import Engine  # noqa: E402
from jee1.edge.settings import Settings  # noqa: E402
from jee1.firmware_bridge import bridge as bridge_mod  # noqa: E402
from jee1.firmware_bridge import transports  # noqa: E402
from jee1.firmware_bridge.codec import Decoder, Frame  # noqa: E402
from jee1.firmware_bridge.protocol import MsgType  # noqa: E402
from jee1.firmware_bridge.ui_sim import UIClient  # noqa: E402

QUESTION = "What is the antidote for heparin?"


def codec_python(frames: list[Frame]) -> float:
    start = time.perf_counter()
    wire = b"".join(f.encode() for f in frames)
    decoded = Decoder().feed(wire)
    assert len(decoded) == len(frames)
    return sum(len(f.payload) for f in frames) / 1e6 / (time.perf_counter() - start)


def codec_c(work: Path) -> float | None:
    """The C codec measured in C (benchmarks/codec_bench.c): encode + byte-wise decode, 1 KiB payloads."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    exe = work / "codec_bench"
    subprocess.run([cc, "-std=c99", "-O2", "-I", str(REPO / "firmware_bridge" / "c"), "-o", str(exe),
                    str(REPO / "benchmarks" / "codec_bench.c"), str(REPO / "firmware_bridge" / "c" / "jee1_frame.c")],
                   check=True)
    return float(subprocess.run([str(exe), "100000"], capture_output=True, text=True, check=True).stdout)


class PacedTransport(transports.SerialTransport):
    """The bridge's serial transport with writes paced like a real UART (10 bits per byte)."""

    baud: int | None = None

    def write(self, data: bytes) -> None:
        if self.baud:  # the bytes reach the far end only after the line has clocked them out
            time.sleep(len(data) * 10 / self.baud)
        super().write(data)


class Master:
    def __init__(self, fd):
        self.fd, self.name = fd, "pty-master"

    def read(self):
        ready, _, _ = select.select([self.fd], [], [], 0.05)
        return os.read(self.fd, 65536) if ready else b""

    def write(self, data):
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]


def link_run(engine, baud: int, paced: bool, questions: int) -> dict:
    master, slave = os.openpty()
    path = os.ttyname(slave)
    os.close(slave)
    PacedTransport.baud = baud if paced else None
    produced: dict[int, float] = {}
    original = bridge_mod.Session.pump

    def pump(self, out):                       # the moment the engine's text reaches the bridge
        produced.setdefault(len(out.data), time.monotonic())
        return original(self, out)

    bridge_mod.Session.pump = pump
    bridge_mod.SerialTransport = PacedTransport
    stop = threading.Event()
    service = bridge_mod.BridgeService(engine, stop)
    service.start_serial(path, baud)
    try:
        deadline = time.monotonic() + 10
        while not service.sessions and time.monotonic() < deadline:
            time.sleep(0.01)
        client = UIClient(Master(master))
        client.hello()
        rates, latencies = [], []
        for _ in range(questions):
            produced.clear()
            received: list[tuple[int, float]] = []
            size = [0]

            def on_text(text):
                size[0] += len(text.encode())
                received.append((size[0], time.monotonic()))

            start = time.monotonic()
            reply = client.ask(QUESTION, on_text=on_text)
            elapsed = time.monotonic() - start
            rates.append(reply.tokens / elapsed)
            marks = sorted(produced.items())
            for offset, at in received:
                made = next((t for o, t in marks if o >= offset), None)
                if made is not None:
                    latencies.append(at - made)
        return {"tokens_per_s": statistics.median(rates),
                "added_latency_ms_median": 1e3 * statistics.median(latencies),
                "added_latency_ms_p95": 1e3 * sorted(latencies)[int(0.95 * (len(latencies) - 1))]}
    finally:
        stop.set()
        service.join()
        bridge_mod.Session.pump = original
        bridge_mod.SerialTransport = transports.SerialTransport
        os.close(master)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="jee1-bridge-bench-") as tmp:
        work = Path(tmp)
        frames = [Frame(MsgType.CHUNK, i, os.urandom(1024)) for i in range(4000)]
        figures = {"codec_python_mb_per_s": round(codec_python(frames), 1)}
        c_rate = codec_c(work)
        figures["codec_c_mb_per_s"] = round(c_rate, 1) if c_rate else None
        model = convert(ConvertOptions(base_dir=build_checkpoint(work / "base", TinySpec()),
                                       adapter_dir=build_adapter(work / "ad", TinySpec(), AdapterSpec()),
                                       output=work / "tiny.gguf", quant=quant_type("Q4_K_M"), quiet=True)).output
        settings = Settings.load(overrides={"model": {"path": str(model), "require_protected": False}, "cache": {"dir": str(work / "c")},
                                            "audit": {"path": str(work / "a.jsonl")},
                                            "runtime": {"n_ctx": 1024, "threads": 2}, "answer": {"max_tokens": 200}})
        with Engine(settings) as engine:
            direct = [engine.ask(QUESTION) for _ in range(args.questions)]
            figures["engine_tokens_per_s"] = round(statistics.median(a.completion_tokens / a.total_s for a in direct), 1)
            for baud in (115200, 921600):
                for paced in (False, True):
                    key = f"pty_{baud}{'_paced_8N1' if paced else ''}"
                    figures[key] = {k: round(v, 2) for k, v in link_run(engine, baud, paced, args.questions).items()}
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"codec, 1 KiB payloads: Python {figures['codec_python_mb_per_s']} MB/s, "
              f"C {figures['codec_c_mb_per_s']} MB/s (encode + byte-at-a-time decode)")
        print(f"engine alone: {figures['engine_tokens_per_s']} tokens/s")
        for key, value in figures.items():
            if key.startswith("pty_"):
                print(f"{key:<22} {value['tokens_per_s']:8.1f} tokens/s   added latency per chunk "
                      f"median {value['added_latency_ms_median']:.2f} ms, p95 {value['added_latency_ms_p95']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
