"""The hardware planner on simulated machines (issue 18).

Expected values are the design's rules, asserted as ranges and relations, not
numbers copied from the implementation. Batch sizes follow the memory model
(`memory.predict`, checked in test_memory.py): only the vision tower stays on
the accelerator and batches fill about 80% of free memory.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings as hyp_settings, strategies as st

from visual_buffet_siglip.config import ConfigError, ModelSettings as Settings  # what the planner reads
from visual_buffet_siglip.cli import main
from visual_buffet_siglip.hardware import CpuInfo, CudaDevice, HardwareProfile, detect
from visual_buffet_siglip.memory import GIB, HEADROOM, predict
from visual_buffet_siglip.modelfacts import REGISTRY, ModelInfo, vision_tokens
from visual_buffet_siglip.plan import Plan
from visual_buffet_siglip.planformat import format_plan
from visual_buffet_siglip.planner import plan
from visual_buffet_siglip.simulate import parse_simulation
from visual_buffet_siglip.sizing import MAX_BATCH

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
GTX1050TI = "cuda:name=GTX 1050 Ti,vram_gb=4,cc=6.1"
GTX1060_3GB = "cuda:name=GTX 1060 3GB,vram_gb=3,cc=6.1,bnb=0.50.2"
MAC16 = "mps:memory_gb=16"
CPU_BF16 = "cpu:cores=8,ram_gb=32,avx2=1,avx512f=1,avx512_bf16=1,amx_bf16=1,model=Xeon"
CPU_PLAIN = "cpu:cores=8,ram_gb=32,avx2=1,model=Ryzen"


def run(spec: str, model=SO400M, **settings) -> Plan:
    return plan(parse_simulation(spec), Settings(**settings), model)


def fails(spec: str, model=SO400M, **settings) -> str:
    with pytest.raises(ConfigError) as info:
        run(spec, model, **settings)
    return str(info.value)


def fill(spec: str, p: Plan, model=SO400M, max_num_patches: int = 256) -> float:
    """Predicted peak (allocator + CUDA context) of plan `p` as a share of the card's free memory."""
    free = parse_simulation(spec).cuda[int(p.device.split(":")[1])].free_gb
    estimate = predict(model, p.dtype, p.quantization, p.batch_size, p.attention,
                       vision_tokens(model, max_num_patches), text_here=p.text_device != "cpu")
    return estimate.peak_total / GIB / free


def fills_80_percent(spec: str, p: Plan, model=SO400M, max_num_patches: int = 256) -> bool:
    """Within the 80% target, and no more than one batch-size step below it (unless capped)."""
    share = fill(spec, p, model, max_num_patches)
    return share <= 1 - HEADROOM and (share >= 0.70 or p.batch_size == MAX_BATCH)


# --- the machines from the design brief and the issue --------------------------------------------------

def test_h100_with_flash_attn():
    p = run(H100_FA)
    assert (p.device, p.dtype, p.attention, p.quantization) == ("cuda:0", "bfloat16", "flash_attention_2", "none")
    assert p.batch_size == MAX_BATCH and fill(H100_FA, p) < 0.5  # so400m-384 reaches the settings' cap first
    assert "flash-attn 2.7.4" in p.reasons["attention"]


def test_h100_without_flash_attn_uses_sdpa():
    p = run(H100)
    assert (p.device, p.dtype, p.attention) == ("cuda:0", "bfloat16", "sdpa")
    assert fills_80_percent(H100, p)
    assert "not installed" in p.reasons["attention"] and "`flash`" in p.reasons["attention"]


def test_a100_40gb():
    p = run(A100)
    assert (p.device, p.dtype, p.attention) == ("cuda:0", "bfloat16", "sdpa")
    assert run("cuda:vram_gb=24,cc=8.0").batch_size <= p.batch_size <= run(H100).batch_size
    assert fills_80_percent(A100, p)


def test_rtx3060_12gb():
    p = run(RTX3060)
    assert (p.device, p.dtype, p.attention) == ("cuda:0", "bfloat16", "sdpa")
    assert run("cuda:vram_gb=8,cc=8.6").batch_size < p.batch_size < run("cuda:vram_gb=16,cc=8.6").batch_size
    assert fills_80_percent(RTX3060, p)


def test_t4_gets_float16_and_sdpa_even_with_flash_attn():
    p = run(T4 + ",flash_attn=2.7.4")
    assert (p.device, p.dtype, p.attention) == ("cuda:0", "float16", "sdpa")
    assert fills_80_percent(T4, p)
    assert "7.5" in p.reasons["dtype"] and "7.5" in p.reasons["attention"]


def test_gtx1050ti_runs_so400m_384_at_float16_without_quantization():
    # issue 18: only the vision tower (~0.43 B parameters, ~0.8 GB at float16) stays on the card
    p = run(GTX1050TI, model=SO400M_V1, dtype="float16")
    assert (p.device, p.dtype, p.quantization) == ("cuda:0", "float16", "none")
    assert p.batch_size >= 2 and fills_80_percent(GTX1050TI, p, SO400M_V1)
    assert p.weights_gb < 1.0 and p.text_device == "cuda:0"  # the text tower fits beside it for encoding
    text = format_plan(parse_simulation(GTX1050TI), p, SO400M_V1)
    assert "only the vision tower stays on cuda:0" in " ".join(text.split())


def test_plan_command_on_a_gtx1050ti(capsys):
    code = main(["plan", "--simulate", GTX1050TI, "--model", "google/siglip-so400m-patch14-384",
                 "--dtype", "float16"])
    out = capsys.readouterr().out
    batch = int(next(line.split()[1] for line in out.splitlines() if line.split()[:1] == ["batch_size"]))
    assert code == 0 and batch >= 2 and "quantization  none" in out


def test_text_tower_encodes_on_the_cpu_when_it_does_not_fit_beside_the_vision_tower():
    roomy = run("cuda:vram_gb=4,cc=7.5")
    tight = run("cuda:vram_gb=4,free_gb=2,cc=7.5")  # vision tower fits, both towers do not
    assert roomy.text_device == "cuda:0" and tight.text_device == "cpu" and tight.batch_size >= 1
    assert "on the CPU" in " ".join(format_plan(parse_simulation("cuda:vram_gb=4,free_gb=2,cc=7.5"), tight,
                                                SO400M).split())
    assert run(CPU_PLAIN, model=BASE).text_device == "cpu"


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_quantized_models_keep_both_towers_on_the_card(quant):
    p = run(GTX1650, quantization=quant)
    assert (p.device, p.dtype, p.attention, p.quantization) == ("cuda:0", "float16", "sdpa", quant)
    assert p.text_device == "cuda:0" and p.batch_size >= 2
    vision_only = run(GTX1650)
    assert p.weights_gb > vision_only.weights_gb * (0.45 if quant == "4bit" else 0.9)  # text tower counted too


def test_giant_on_3gb_does_not_fit_at_half_and_says_what_would():
    message = fails(GTX1060_3GB, model=GIANT)
    assert "2.7 GB free of 3.0 GB" in message and "float16" in message and "vision tower" in message
    assert 'quantization = "4bit"' in message  # both towers at 4 bit fit; at 8 bit they do not
    assert 'quantization = "8bit"' not in message
    assert 'device = "cpu"' in message  # device is auto: say so rather than fall back silently
    smaller = message.split('model = "')[1].split('"')[0]
    assert smaller in REGISTRY and REGISTRY[smaller].size in ("base", "large", "so400m")
    assert plan(parse_simulation(GTX1060_3GB), Settings(), REGISTRY[smaller]).batch_size >= 1  # the advice holds
    assert run(GTX1060_3GB, model=GIANT, quantization="4bit").batch_size >= 1


def test_explicit_cuda_that_does_not_fit_does_not_suggest_cpu():
    message = fails(GTX1060_3GB, model=GIANT, device="cuda")
    assert 'quantization = "4bit"' in message and 'device = "cpu"' not in message


def test_apple_mps_16gb():
    p = run(MAC16)
    assert (p.device, p.dtype, p.attention, p.quantization) == ("mps", "float16", "sdpa", "none")
    memory = parse_simulation(MAC16).mps_memory_gb
    share = predict(SO400M, "float16", "none", p.batch_size, "sdpa", 729, text_here=True).peak_total / GIB / memory
    assert 0.7 <= share <= 0.8 and p.text_device == "mps"


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
    roomy = run("cpu:cores=16,ram_gb=64", model=SO400M).batch_size
    tight = run("cpu:cores=16,ram_gb=6", model=SO400M).batch_size
    assert 1 <= tight < roomy


def test_cpu_warns_when_weights_exceed_ram():
    p = run("cpu:cores=4,ram_gb=4", model=GIANT)
    assert p.batch_size == 1 and any("RAM" in w for w in p.warnings)


# --- batches fill about 80% of free memory (issue 18) ----------------

@pytest.mark.parametrize("model", [SO400M, SO400M_V1])
@pytest.mark.parametrize("vram", [6, 8, 12, 16, 24, 40, 80])
def test_batches_fill_about_80_percent_of_free_memory(model, vram):
    for cc in ("7.5", "8.0"):  # float16 and bfloat16
        spec = f"cuda:vram_gb={vram},cc={cc}"
        p = run(spec, model=model)
        assert p.dtype in ("float16", "bfloat16") and p.quantization == "none"
        assert p.batch_size >= 64 and fills_80_percent(spec, p, model), (vram, cc, p.batch_size, fill(spec, p, model))


@pytest.mark.parametrize("vram", [24, 40, 80])
def test_large_cards_fill_80_percent_where_the_batch_cap_allows(vram):
    spec = f"cuda:vram_gb={vram},cc=8.0"
    p = run(spec, attention="eager")  # eager attention's score matrices: ~5x the memory per image
    assert p.batch_size < MAX_BATCH and fills_80_percent(spec, p)
    q = run(spec, model=NAFLEX, max_num_patches=1024)
    assert fills_80_percent(spec, q, NAFLEX, 1024)


def test_the_memory_reason_is_printed():
    p = run(T4)
    assert "80%" in p.reasons["batch_size"] and "vision tower" in p.reasons["batch_size"]


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
    p = run(GTX1650, batch_size=512)
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
    message = fails("cuda:name=RTX 3050,vram_gb=4,cc=8.6", model=GIANT, dtype="float32")
    assert "at float32" in message and "3.7 GB free" in message and 'dtype = "bfloat16"' in message
    assert run("cuda:name=RTX 3050,vram_gb=4,cc=8.6", model=GIANT, dtype="bfloat16").batch_size >= 1


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
    with pytest.raises(dataclasses.FrozenInstanceError):
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
    code = ("import sys\n"
            "from visual_buffet_siglip import ModelSettings as Settings\n"
            "from visual_buffet_siglip.modelfacts import REGISTRY\n"
            "from visual_buffet_siglip.planformat import format_plan\n"
            "from visual_buffet_siglip.planner import plan\n"
            "from visual_buffet_siglip.simulate import parse_simulation\n"
            "profile, model = parse_simulation('cpu:cores=2'), REGISTRY['google/siglip2-base-patch16-224']\n"
            "format_plan(profile, plan(profile, Settings(), model), model)\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                            env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
