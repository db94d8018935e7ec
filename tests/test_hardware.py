"""The hardware planner on simulated machines (DESIGN section 5).

Expected values are the design's rules and its seed batch table, asserted as
ranges and relations, not numbers copied from the implementation.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings as hyp_settings, strategies as st

from visual_buffet_siglip.config import ConfigError, Settings
from visual_buffet_siglip.hardware import (
    CpuInfo, CudaDevice, HardwareProfile, Plan, detect, format_plan, parse_simulation, plan,
)
from visual_buffet_siglip.models import REGISTRY, ModelInfo

SO400M = REGISTRY["google/siglip2-so400m-patch14-384"]
SO400M_V1 = REGISTRY["google/siglip-so400m-patch14-384"]
BASE = REGISTRY["google/siglip2-base-patch16-224"]
GIANT = REGISTRY["google/siglip2-giant-opt-patch16-384"]
NAFLEX = REGISTRY["google/siglip2-so400m-patch16-naflex"]

H100_FA = "cuda:name=H100,vram_gb=80,cc=9.0,flash_attn=2.7.4"
H100 = "cuda:name=H100,vram_gb=80,cc=9.0"
A100 = "cuda:name=A100,vram_gb=40,cc=8.0"
RTX3060 = "cuda:name=RTX 3060,vram_gb=12,cc=8.6"
T4 = "cuda:name=T4,vram_gb=16,cc=7.5"
GTX1650 = "cuda:name=GTX 1650,vram_gb=4,cc=7.5,bnb=0.50.2"
MAC16 = "mps:memory_gb=16"
CPU_BF16 = "cpu:cores=8,ram_gb=32,avx2=1,avx512f=1,avx512_bf16=1,amx_bf16=1,model=Xeon"
CPU_PLAIN = "cpu:cores=8,ram_gb=32,avx2=1,model=Ryzen"


def run(spec: str, model=SO400M, **settings) -> Plan:
    return plan(parse_simulation(spec), Settings(**settings), model)


def fails(spec: str, model=SO400M, **settings) -> str:
    with pytest.raises(ConfigError) as info:
        run(spec, model, **settings)
    return str(info.value)


# --- the machines from DESIGN / the issue -----------------------------------------------------

def test_h100_with_flash_attn():
    p = run(H100_FA)
    assert (p.device, p.dtype, p.attention, p.quantization) == ("cuda:0", "bfloat16", "flash_attention_2", "none")
    assert 16 <= p.batch_size <= 64  # "24 GB+ -> 16-32", clamped for an 80 GB card
    assert "flash-attn 2.7.4" in p.reasons["attention"]


def test_h100_without_flash_attn_uses_sdpa():
    p = run(H100)
    assert (p.device, p.dtype, p.attention) == ("cuda:0", "bfloat16", "sdpa")
    assert 16 <= p.batch_size <= 64
    assert "not installed" in p.reasons["attention"] and "`flash`" in p.reasons["attention"]


def test_a100_40gb():
    p = run(A100)
    assert (p.device, p.dtype, p.attention) == ("cuda:0", "bfloat16", "sdpa")
    assert run("cuda:vram_gb=24,cc=8.0").batch_size <= p.batch_size <= run(H100).batch_size
    assert 16 <= p.batch_size <= 64


def test_rtx3060_12gb():
    p = run(RTX3060)
    assert (p.device, p.dtype, p.attention) == ("cuda:0", "bfloat16", "sdpa")
    assert 4 <= p.batch_size <= 16  # between the 8 GB and 16 GB rows of the seed table


def test_t4_gets_float16_and_sdpa_even_with_flash_attn():
    p = run(T4 + ",flash_attn=2.7.4")
    assert (p.device, p.dtype, p.attention) == ("cuda:0", "float16", "sdpa")
    assert 8 <= p.batch_size <= 16
    assert "7.5" in p.reasons["dtype"] and "7.5" in p.reasons["attention"]


def test_gtx1650_so400m_does_not_fit_at_half_and_says_what_would():
    message = fails(GTX1650)
    assert "6.0 GB" in message and "4.0 GB" in message and "float16" in message
    assert 'quantization = "4bit"' in message and 'quantization = "8bit"' in message
    assert 'device = "cpu"' in message  # device is auto: say so rather than fall back silently
    smaller = message.split('model = "')[1].split('"')[0]
    assert smaller in REGISTRY and REGISTRY[smaller].size in ("base", "large")
    assert plan(parse_simulation(GTX1650), Settings(), REGISTRY[smaller]).batch_size >= 1  # the advice holds


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_gtx1650_so400m_quantized_plans_batch_1_or_2(quant):
    p = run(GTX1650, quantization=quant)
    assert (p.device, p.dtype, p.attention, p.quantization) == ("cuda:0", "float16", "sdpa", quant)
    assert 1 <= p.batch_size <= 2


def test_explicit_cuda_that_does_not_fit_does_not_suggest_cpu():
    message = fails(GTX1650, device="cuda")
    assert 'quantization = "4bit"' in message and 'device = "cpu"' not in message


def test_apple_mps_16gb():
    p = run(MAC16)
    assert (p.device, p.dtype, p.attention, p.quantization) == ("mps", "float16", "sdpa", "none")
    assert 4 <= p.batch_size <= 16


@pytest.mark.parametrize("spec", [CPU_BF16, CPU_PLAIN])
def test_cpu_is_float32_with_or_without_bf16(spec):
    p = run(spec, model=BASE)
    assert (p.device, p.dtype, p.attention, p.quantization) == ("cpu", "float32", "sdpa", "none")
    assert 8 <= p.batch_size <= 16  # base model, 8 cores
    assert "exact" in p.reasons["dtype"]
    assert ("avx512_bf16" in p.reasons["dtype"]) == (spec == CPU_BF16)
    big = run(spec, model=SO400M)
    assert 1 <= big.batch_size < p.batch_size  # bigger models get smaller CPU batches


def test_cpu_batch_is_bounded_by_ram():
    roomy = run("cpu:cores=16,ram_gb=64", model=BASE).batch_size
    tight = run("cpu:cores=16,ram_gb=4", model=BASE).batch_size
    assert 1 <= tight < roomy


def test_cpu_warns_when_weights_exceed_ram():
    p = run("cpu:cores=4,ram_gb=4", model=GIANT)
    assert p.batch_size == 1 and any("RAM" in w for w in p.warnings)


# --- the seed table: so400m-patch14-384 at half precision ---------------------------------------

@pytest.mark.parametrize("model", [SO400M, SO400M_V1])
@pytest.mark.parametrize(("vram", "low", "high"), [(8, 4, 8), (16, 8, 16), (24, 16, 32), (80, 16, 64)])
def test_seed_table(model, vram, low, high):
    for cc in ("7.5", "8.0"):  # float16 and bfloat16
        p = run(f"cuda:vram_gb={vram},cc={cc}", model=model)
        assert p.dtype in ("float16", "bfloat16") and p.quantization == "none"
        assert low <= p.batch_size <= high, (vram, cc, p.batch_size)


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_seed_table_4gb_row_needs_quantization(quant):
    assert 1 <= run("cuda:vram_gb=4,cc=8.0,bnb=0.50.2", quantization=quant).batch_size <= 2


@hyp_settings(max_examples=60, deadline=None)
@given(vram=st.floats(1, 200), extra=st.floats(0.5, 100), cc=st.sampled_from(["6.1", "7.5", "8.0", "9.0"]),
       model=st.sampled_from(sorted(REGISTRY)), quant=st.sampled_from(["none", "8bit", "4bit"]))
def test_batch_grows_with_memory_and_stays_in_range(vram, extra, cc, model, quant):
    info = REGISTRY[model]

    def batch(total: float) -> int | None:
        try:
            return run(f"cuda:vram_gb={total:.3f},cc={cc},bnb=0.50.2", model=info, quantization=quant).batch_size
        except ConfigError:
            return None

    small, big = batch(vram), batch(vram + extra)
    for b in (small, big):
        assert b is None or 1 <= b <= 1024
    if small is not None:
        assert big is not None and big >= small


def test_naflex_batch_follows_max_num_patches():
    few = run("cuda:vram_gb=16,cc=8.0", model=NAFLEX, max_num_patches=256).batch_size
    many = run("cuda:vram_gb=16,cc=8.0", model=NAFLEX, max_num_patches=1024).batch_size
    assert 1 <= many < few


def test_naflex_never_auto_selects_flash_attention():
    p = run(H100_FA, model=NAFLEX)
    assert p.attention == "sdpa" and "NaFlex" in p.reasons["attention"]
    message = fails(H100_FA, model=NAFLEX, attention="flash_attention_2")
    assert 'attention = "flash_attention_2"' in message and "NaFlex" in message


def test_multi_gpu_picks_most_free_memory():
    p = run("cuda:name=busy,vram_gb=24,free_gb=2,cc=8.6;cuda:name=idle,vram_gb=24,cc=8.6")
    assert p.device == "cuda:1" and "idle" in p.reasons["device"]


def test_little_free_memory_is_an_error_before_loading():
    message = fails("cuda:name=L4,vram_gb=24,free_gb=1.5,cc=8.9")
    assert "free" in message and "1.5 GB" in message


# --- explicit settings win ---------------------------------------------------------------------

def test_explicit_settings_win():
    assert run(H100_FA, device="cpu").device == "cpu"
    fp32 = run(H100_FA, dtype="float32")
    assert fp32.dtype == "float32" and fp32.attention == "sdpa" and "float32" in fp32.reasons["attention"]
    assert run(H100_FA, attention="eager").attention == "eager"
    assert run(H100_FA, attention="sdpa").attention == "sdpa"
    assert run(H100_FA, dtype="float16").attention == "flash_attention_2"
    p = run(T4, batch_size=7)
    assert p.batch_size == 7 and "set in config" in p.reasons["batch_size"]
    q = run(T4 + ",bnb=0.50.2", quantization="8bit")
    assert q.quantization == "8bit" and q.dtype == "float16" and "8bit" in q.reasons["dtype"]
    assert run("cuda:vram_gb=16,cc=8.0;cuda:vram_gb=16,free_gb=4,cc=8.0", device="cuda:1",
               model=BASE).device == "cuda:1"
    assert run(MAC16, device="cpu").device == "cpu"


def test_explicit_batch_far_above_fit_warns():
    p = run(T4, batch_size=512)
    assert p.batch_size == 512 and any("batch_size = 512" in w for w in p.warnings)


def test_quantization_forces_half_compute_on_cuda_and_float32_on_cpu():
    assert run("cuda:vram_gb=8,cc=8.6,bnb=0.50.2", quantization="4bit").dtype == "bfloat16"
    assert run("cuda:vram_gb=8,cc=7.5,bnb=0.50.2", quantization="4bit").dtype == "float16"
    cpu = run("cpu:cores=8,ram_gb=32;cuda:vram_gb=8,bnb=0.50.2", quantization="4bit", device="cpu")
    assert cpu.dtype == "float32" and cpu.quantization == "4bit"
    assert "CPU" in cpu.reasons["quantization"] and any("slower" in w for w in cpu.warnings)


def test_cpu_4bit_refused_where_bitsandbytes_avx512_bf16_kernel_cannot_run_so400m():
    # bitsandbytes 0.50.2's AVX512-BF16 4-bit CPU kernel asserts widths divisible by 64;
    # so400m's MLP is 4304 wide (measured: "N must be divisible by block_n").
    message = fails(CPU_BF16 + ",bnb=0.50.2", quantization="4bit")
    assert 'quantization = "4bit"' in message and "4304" in message and '"8bit"' in message
    assert run(CPU_PLAIN + ",bnb=0.50.2", quantization="4bit").quantization == "4bit"  # slow path works
    assert run(CPU_BF16 + ",bnb=0.50.2", quantization="8bit").quantization == "8bit"
    assert run(CPU_BF16 + ",bnb=0.50.2", model=BASE, quantization="4bit").quantization == "4bit"  # 768/3072
    tiny = ModelInfo("tiny", "siglip", "base", 32, 8, 1, 1, 32, 2, in_registry=False)  # test-sized width 32
    assert "width 32" in fails(CPU_BF16 + ",bnb=0.50.2", model=tiny, quantization="4bit")


def test_float32_that_does_not_fit_suggests_half():
    message = fails("cuda:name=RTX 3070,vram_gb=8,cc=8.6", dtype="float32")
    assert "12.0 GB" in message and 'dtype = "bfloat16"' in message


@pytest.mark.parametrize(("spec", "settings", "key", "hint"), [
    ("cpu:cores=4", {"device": "cuda"}, 'device = "cuda"', "no CUDA GPU"),
    (T4, {"device": "cuda:1"}, 'device = "cuda:1"', "cuda:0 (T4)"),
    (T4, {"device": "mps"}, 'device = "mps"', "not available"),
    (T4, {"dtype": "bfloat16"}, 'dtype = "bfloat16"', "8.0"),
    (H100, {"attention": "flash_attention_2"}, 'attention = "flash_attention_2"', "`flash` extra"),
    ("cpu:cores=4,flash_attn=2.7.4", {"attention": "flash_attention_2"}, 'attention = "flash_attention_2"', "cpu"),
    (T4 + ",flash_attn=2.7.4", {"attention": "flash_attention_2"}, 'attention = "flash_attention_2"', "7.5"),
    (H100_FA, {"attention": "flash_attention_2", "dtype": "float32"}, 'attention = "flash_attention_2"',
     "float32"),
    (T4, {"quantization": "4bit"}, 'quantization = "4bit"', "`quant` extra"),
    (T4 + ",bnb=0.43.1", {"quantization": "8bit"}, 'quantization = "8bit"', "0.46.1"),
    (MAC16 + ",bnb=0.50.2", {"quantization": "8bit"}, 'quantization = "8bit"', "MPS"),
])
def test_impossible_explicit_choices_name_the_setting(spec, settings, key, hint):
    message = fails(spec, model=BASE, **settings)
    assert key in message and hint in message


def test_all_impossible_choices_are_reported_together():
    message = fails(T4, model=BASE, dtype="bfloat16", attention="flash_attention_2", quantization="4bit")
    assert "dtype" in message and "attention" in message and "quantization" in message


def test_float16_on_cpu_is_allowed_with_a_warning():
    p = run(CPU_PLAIN, model=BASE, dtype="float16")
    assert p.dtype == "float16" and any("slower" in w for w in p.warnings)
    assert any("emulated" in w for w in run(CPU_PLAIN, model=BASE, dtype="bfloat16").warnings)


def test_pascal_float16_warns():
    p = run("cuda:name=GTX 1080,vram_gb=8,cc=6.1", model=BASE)
    assert p.dtype == "float16" and any("float32" in w for w in p.warnings)


# --- the Plan object ---------------------------------------------------------------------------

def test_plan_has_a_reason_per_choice_and_is_hashable():
    p = run(H100_FA)
    assert set(p.reasons) == {"device", "backend", "dtype", "attention", "quantization", "batch_size"}
    assert all(p.reasons[k] and p.reason(k) == p.reasons[k] for k in p.reasons)
    assert hash(p) == hash(run(H100_FA)) and p == run(H100_FA)
    assert p.to_dict()["reasons"]["dtype"] == p.reasons["dtype"]
    with pytest.raises(Exception):
        p.batch_size = 3  # type: ignore[misc]


def test_plan_accepts_a_plain_dict_of_reasons():
    p = Plan("cpu", "float32", "sdpa", 4, reasons={"device": "why"})
    assert p.reasons["device"] == "why" and isinstance(hash(p), int)


# --- simulation specs --------------------------------------------------------------------------

def test_parse_simulation_cuda():
    profile = parse_simulation("cuda:name=T4,vram_gb=16,cc=7.5,flash_attn=2.7.4,bnb=0.45")
    assert profile.cuda == (CudaDevice(0, "T4", 16.0, pytest.approx(15.7), (7, 5)),)
    assert profile.flash_attn == "2.7.4" and profile.bitsandbytes == "0.45" and not profile.mps
    assert profile.cpu.cores >= 1 and profile.cpu.ram_gb > 0  # a default CPU
    assert parse_simulation("cuda:vram_gb=24,free_gb=10").cuda[0].free_gb == 10


def test_parse_simulation_cpu_and_mps():
    cpu = parse_simulation("cpu:cores=8,ram_gb=32,avx512_bf16=1,avx2=0,model=Xeon").cpu
    assert cpu == CpuInfo("Xeon", 8, 32.0, pytest.approx(28.8), frozenset({"avx512_bf16"}))
    mac = parse_simulation(MAC16)
    assert mac.mps and not mac.cuda and mac.cpu.ram_gb == 16 and 8 <= mac.mps_memory_gb <= 16
    both = parse_simulation("cpu:cores=64,ram_gb=512; cuda:vram_gb=80,cc=9.0; cuda:vram_gb=80,cc=9.0")
    assert both.cpu.cores == 64 and [g.index for g in both.cuda] == [0, 1]


@pytest.mark.parametrize("spec", [
    "", "tpu:cores=4", "cuda:name=T4", "cuda:vram_gb=abc", "cuda:vram_gb=16,cc=seven",
    "cuda:vram_gb=8,free_gb=9", "cuda:vram_gb=-1", "cpu:cores=0", "cpu:bogus=1", "cpu:avx2=maybe",
    "cpu:cores", "cuda:vram_gb=8;mps:memory_gb=16", "cpu:cores=2;cpu:cores=4", "mps:memory_gb=nan",
])
def test_parse_simulation_rejects_bad_specs(spec):
    with pytest.raises(ConfigError) as info:
        parse_simulation(spec)
    assert "KIND:key=value" in str(info.value)


# --- format_plan -------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [H100_FA, MAC16, CPU_BF16, GTX1650])
def test_format_plan_mentions_profile_and_every_reason(spec):
    profile = parse_simulation(spec)
    settings = Settings(quantization="4bit") if spec == GTX1650 else Settings()
    p = plan(profile, settings, SO400M)
    text = format_plan(profile, p, SO400M)
    flat = " ".join(text.split())
    for key, reason in p.reasons.items():
        assert key in text and " ".join(reason.split()) in flat
    for warning in p.warnings:
        assert " ".join(warning.split()) in flat
    assert SO400M.id in text and profile.cpu.model in text and "simulated" in text
    for gpu in profile.cuda:
        assert gpu.name in text and gpu.cc in text
    assert (profile.flash_attn or "flash-attn not installed") in text
    assert ("available" if profile.mps else "not available") in text


# --- detection ---------------------------------------------------------------------------------

def test_detect_survives_a_broken_or_missing_torch(monkeypatch):
    import visual_buffet_siglip.hardware as hw

    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("driver exploded")

    assert hw._detect_cuda(Broken()) == () and hw._detect_mps(Broken()) is False
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    profile = detect()
    assert profile.cuda == () and not profile.mps and profile.torch_version == ""
    assert plan(profile, Settings(), BASE).device == "cpu"


def test_detect_this_machine():
    profile = detect()
    assert isinstance(profile, HardwareProfile) and not profile.simulated
    assert profile.cpu.cores >= 1 and profile.cpu.ram_gb > 0
    assert 0 <= profile.cpu.available_ram_gb <= profile.cpu.ram_gb
    assert profile.torch_version  # torch is installed here
    for gpu in profile.cuda:
        assert 0 <= gpu.free_gb <= gpu.total_gb and gpu.capability >= (3, 0)
    p = plan(profile, Settings(), BASE)  # whatever this machine is, it gets a plan
    assert p.batch_size >= 1 and format_plan(profile, p, BASE)


def test_importing_hardware_does_not_import_torch():
    code = ("import sys, visual_buffet_siglip.hardware as h; h.parse_simulation('cpu:cores=2'); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                            env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
