"""Export time and size on disk per artefact, with the parity numbers and the FP16/INT8 F1 change.

    python -m dfineseg.benchmarks.export_report weights=runs/demo/best.pt data=demo/data.yaml \\
        [formats=onnx,openvino] [half=true] [int8=true] [imgsz=640] [out=runs/export_bench]
    python -m dfineseg.benchmarks.export_report --summary runs/demo/export_summary.json

The first form exports (parity on) and reports; the second only formats an earlier export's
`export_summary.json`. Both print a Markdown table and write `export_report.md` and
`export_report.json` next to the summary.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from dfineseg.utils.outputs import OutputFolder

DEFAULTS = {"formats": "onnx,openvino", "half": "true", "int8": "true"}


def _check(art: dict[str, Any], name: str) -> dict[str, Any] | None:
    parity = art.get("parity")
    if not parity:
        return None
    return next((c for c in parity["report"]["checks"] if c["name"] == name), None)


def rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key, art in summary["artefacts"].items():
        raw, f1 = _check(art, "raw"), _check(art, "f1")
        det = _check(art, "detections")
        row = {
            "artefact": key,
            "file": Path(art["path"]).name,
            "precision": art["precision"],
            "export_s": art["export_seconds"],
            "size_mb": art["size_bytes"] / 1e6,
            "parity": None if art.get("parity") is None else ("pass" if art["parity"]["passed"] else "FAIL"),
            "raw_max_abs": raw["value"] if raw else None,
            "min_box_iou": det["detail"].get("min_box_iou") if det else None,
            "min_mask_iou": det["detail"].get("min_mask_iou") if det else None,
            "torch_f1": f1["detail"].get("torch_f1") if f1 else None,
            "export_f1": f1["detail"].get("export_f1") if f1 else None,
            "f1_change": f1["detail"].get("change") if f1 else None,
        }
        if "int8" in art:
            row["int8_note"] = art["int8"]["note"]
        out.append(row)
    return out


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, int | float) else str(value)


def markdown(summary: dict[str, Any], header: dict[str, Any]) -> str:
    lines = [
        f"Export of `{summary['weights']}` at {summary['imgsz'][0]}x{summary['imgsz'][1]}, "
        f"batch {'dynamic' if summary['dynamic_batch'] else summary['batch']}, top-K {summary['topk']}; "
        f"{header['machine']}, {header['date']}.",
        "",
        "| artefact | precision | export s | size MB | parity | raw max abs | min box IoU | min mask IoU | F1 torch | F1 export | F1 change |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows(summary):
        lines.append(
            f"| {r['file']} | {r['precision']} | {_fmt(r['export_s'], '.1f')} | {_fmt(r['size_mb'], '.2f')} | "
            f"{_fmt(r['parity'], '')} | {_fmt(r['raw_max_abs'], '.2e')} | {_fmt(r['min_box_iou'], '.4f')} | "
            f"{_fmt(r['min_mask_iou'], '.4f')} | {_fmt(r['torch_f1'], '.4f')} | {_fmt(r['export_f1'], '.4f')} | "
            f"{_fmt(r['f1_change'], '+.4f')} |"
        )
    # What did not pass is said too: a report listing only the artefacts that were made would read as a pass.
    results = summary.get("results") or {}
    unhappy = {k: r for k, r in results.items() if r.get("status") not in ("passed", "not-checked")}
    if summary.get("status") or unhappy:
        lines += ["", f"Export status: {summary.get('status', 'unknown')}"
                  + (f" ({summary['error']})" if summary.get("error") else "")]
        lines += [f"- {k}: {r['status']}" + (f" ({r.get('error') or r.get('reason')})" if r.get("error") or r.get("reason")
                                             else "") + (f" -> {r['path']}" if r.get("path") else "")
                  for k, r in unhappy.items()]
    notes = [r["int8_note"] for r in rows(summary) if r.get("int8_note")]
    if notes:
        lines += ["", *[f"INT8: {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def machine() -> str:
    import os

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


def run_export(overrides: list[str]) -> Path:
    from dfineseg.config import EXPORT_ALIASES, load_config
    from dfineseg.export.api import export

    given = {o.split("=", 1)[0] for o in overrides}
    merged = overrides + [f"{k}={v}" for k, v in DEFAULTS.items() if k not in given]
    cfg = load_config(None, merged, aliases=EXPORT_ALIASES)
    return export(cfg)["summary"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", help="format an existing export_summary.json instead of exporting")
    parser.add_argument("overrides", nargs="*", help="export overrides, as for `dfineseg export`")
    ns = parser.parse_args(argv)
    t0 = time.perf_counter()
    summary_path = Path(ns.summary) if ns.summary else run_export(ns.overrides)
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    header = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": " ".join(sys.argv), "wall_s": round(time.perf_counter() - t0, 1)}
    text = markdown(summary, header)
    print(text)
    # Next to the summary, through its folder's ledger: never over a file dfineseg did not write there.
    folder = OutputFolder(summary_path.parent, command="export_report", protect=[summary_path])
    folder.write_text("export_report.md", text)
    folder.write_text("export_report.json", json.dumps({"header": header, "rows": rows(summary)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
