"""Op level: fastprompt.ops.prefix_attention vs the PEFT-style path (per-row prefix, torch.cat, 4D mask
[B,1,S,P+S], repeat_kv for GQA, SDPA, through transformers' own sdpa_mask / sdpa_attention_forward)."""
import pytest

from _pairs import PROVIDERS, run_benchmark
from fastprompt.bench.cases import attention_case


def _seqs(device, size):
    if device.startswith("cuda"):
        return (128, 512, 1024, 2048, 4096) if size == "full" else (128, 1024, 4096)
    return (64, 128, 256, 512) if size == "full" else (64, 256)


def _prefixes(size):
    return (8, 32, 128, 200) if size == "full" else (8, 200)


def pytest_generate_tests(metafunc):
    size = metafunc.config.getoption("--bench-size")
    device = metafunc.config.getoption("--device")
    if "seq" in metafunc.fixturenames:
        metafunc.parametrize("seq", _seqs(device, size))
    if "plen" in metafunc.fixturenames:
        metafunc.parametrize("plen", _prefixes(size))
    if "batch" in metafunc.fixturenames:
        metafunc.parametrize("batch", (1, 4, 16) if size == "full" else (2,))
    if "heads" in metafunc.fixturenames:  # (Hq, Hkv, D): MHA, GQA 4:1, MQA, head dim 128
        metafunc.parametrize("heads", ((8, 8, 64), (8, 2, 64), (8, 1, 64), (4, 1, 128)) if size == "full"
                             else ((8, 1, 64), (4, 1, 128)), ids=lambda h: f"Hq{h[0]}-Hkv{h[1]}-D{h[2]}")


def _ref_seq(device):
    return 1024 if device.startswith("cuda") else 256


@PROVIDERS
@pytest.mark.parametrize("kind", ["fwd", "fwd+bwd"])
def test_prefix_attention_seq(benchmark, device, provider, kind, seq):
    run_benchmark(benchmark, attention_case(kind, 8, seq, 32), provider, device)


@PROVIDERS
def test_prefix_attention_prefix_len(benchmark, device, provider, plen):
    run_benchmark(benchmark, attention_case("fwd+bwd", 8, _ref_seq(device), plen), provider, device)


@PROVIDERS
def test_prefix_attention_batch(benchmark, device, provider, batch):
    run_benchmark(benchmark, attention_case("fwd+bwd", batch, _ref_seq(device), 32), provider, device)


@PROVIDERS
def test_prefix_attention_heads(benchmark, device, provider, heads):
    hq, hkv, dim = heads
    run_benchmark(benchmark, attention_case("fwd+bwd", 8, _ref_seq(device), 32, hq=hq, hkv=hkv, dim=dim),
                  provider, device)


@PROVIDERS
@pytest.mark.parametrize("cache", [256, 1024])
def test_prefix_attention_decode(benchmark, device, provider, cache):
    run_benchmark(benchmark, attention_case("decode", 8, cache, 32), provider, device)
