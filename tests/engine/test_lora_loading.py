"""Reading PEFT adapters: scaling, ranks, content hash, and every refusal of a bad or unsupported one.

Adapters are tenant uploads, so each refusal is tried with a real file that exercises it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file, save, save_file

from engine import adapter_file
from engine.lora import AdapterError, load_adapter
from engine.model_loader import load_config
from engine.ops import DOWN, GATE_UP, O_PROJ, QKV
from tests.helpers.hf_models import ALL_TARGETS, make_peft_adapter, make_tiny_model


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("base"), "llama")


@pytest.fixture(scope="module")
def good(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peft_adapter(base, tmp_path_factory.mktemp("good"), r=8, alpha=16, target_modules=ALL_TARGETS)


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, **changes: object) -> None:
    path = folder / "adapter_config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def edit_tensors(folder: Path, fn) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = fn(load_file(str(path)))
    save_file(tensors, str(path))


def test_reads_a_peft_adapter(base: Path, good: Path) -> None:
    cfg = load_config(base)
    adapter = load_adapter(good, cfg, max_rank=16)
    digest = hashlib.sha256((good / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert adapter.content_hash == digest
    assert adapter.rank == 8 and adapter.scaling == pytest.approx(2.0)
    assert set(adapter.a) == set(ALL_TARGETS)
    assert adapter.a["q_proj"].shape == (cfg.num_layers, 8, cfg.hidden_size)
    assert adapter.b["k_proj"].shape == (cfg.num_layers, cfg.kv_size, 8)
    assert adapter.b["down_proj"].shape == (cfg.num_layers, cfg.hidden_size, 8)
    assert (adapter.ranks == 8).all()
    raw = load_file(str(good / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    assert torch.equal(adapter.b["up_proj"][1], raw[key])


def test_rslora_scaling_and_patterns(base: Path, tmp_path: Path) -> None:
    cfg = load_config(base)
    rs = load_adapter(make_peft_adapter(base, tmp_path / "rs", r=16, alpha=8, use_rslora=True), cfg, 16)
    assert rs.scaling == pytest.approx(8 / math.sqrt(16))
    pat = make_peft_adapter(
        base,
        tmp_path / "pat",
        r=8,
        alpha=16,
        target_modules=("q_proj", "o_proj", "gate_proj"),
        rank_pattern={"o_proj": 2},
        alpha_pattern={"gate_proj": 64},
    )
    adapter = load_adapter(pat, cfg, 16)
    assert adapter.a["o_proj"].shape[1] == 2
    assert adapter.ranks[:, QKV].tolist() == [8, 8]
    assert adapter.ranks[:, O_PROJ].tolist() == [2, 2]
    assert adapter.ranks[:, GATE_UP].tolist() == [8, 8] and adapter.ranks[:, DOWN].tolist() == [0, 0]
    # gate_proj's own scale is 64/8 = 8, 4x the adapter's 2: folded into its B.
    raw = load_file(str(pat / "adapter_model.safetensors"))
    b = raw["base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight"]
    torch.testing.assert_close(adapter.b["gate_proj"][0], b * 4)
    # o_proj: rank 2 with alpha 16 -> scale 8, also 4x.
    b = raw["base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"]
    torch.testing.assert_close(adapter.b["o_proj"][0], b * 4)


def test_layers_to_transform_leaves_other_layers_zero(base: Path, tmp_path: Path) -> None:
    folder = make_peft_adapter(
        base, tmp_path / "l1", r=4, target_modules=("v_proj",), layers_to_transform=[1]
    )
    adapter = load_adapter(folder, load_config(base), 16)
    assert torch.count_nonzero(adapter.a["v_proj"][0]) == 0
    assert torch.count_nonzero(adapter.a["v_proj"][1]) > 0
    assert adapter.ranks[:, QKV].tolist() == [0, 4]


@pytest.mark.parametrize(
    ("lora_kwargs", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "lora_only"}, "bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ],
)
def test_unsupported_peft_features_are_refused(base: Path, tmp_path: Path, lora_kwargs, message) -> None:
    folder = make_peft_adapter(base, tmp_path / "x", r=4, **lora_kwargs)
    with pytest.raises(AdapterError, match=message):
        load_adapter(folder, load_config(base), 16)


def test_unsupported_targets_are_refused(base: Path, tmp_path: Path) -> None:
    folder = make_peft_adapter(base, tmp_path / "emb", r=4, target_modules=("q_proj", "embed_tokens"))
    with pytest.raises(AdapterError, match="embed_tokens"):
        load_adapter(folder, load_config(base), 16)


def test_rank_above_max_is_refused(base: Path, good: Path) -> None:
    with pytest.raises(AdapterError, match="exceeds max_lora_rank 4"):
        load_adapter(good, load_config(base), 4)


def test_adapter_for_another_model_is_refused(good: Path, tmp_path: Path) -> None:
    other = make_tiny_model(tmp_path / "wide", "llama", hidden_size=96, intermediate_size=128)
    with pytest.raises(AdapterError, match="do not fit"):
        load_adapter(good, load_config(other), 16)
    shallow = make_tiny_model(tmp_path / "shallow", "llama", num_hidden_layers=1)
    with pytest.raises(AdapterError, match="layer 1"):
        load_adapter(good, load_config(shallow), 16)


def test_hash_mismatch_is_refused(base: Path, good: Path) -> None:
    with pytest.raises(AdapterError, match="does not match"):
        load_adapter(good, load_config(base), 16, expected_hash="0" * 64)


def test_pickled_weights_are_never_loaded(base: Path, good: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(good / "adapter_config.json", folder)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (marker.write_text, ("ran",))

    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(AdapterError, match=r"no adapter_model\.safetensors"):
        load_adapter(folder, load_config(base), 16)
    assert not marker.exists()


def test_malformed_files_are_refused(base: Path, good: Path, tmp_path: Path) -> None:
    cfg = load_config(base)
    folder = copy_adapter(good, tmp_path / "garbage")
    (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(AdapterError, match="not a readable safetensors"):
        load_adapter(folder, cfg, 16)
    folder = copy_adapter(good, tmp_path / "oversized")
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * (2 << 20))
    with pytest.raises(AdapterError, match="larger than any adapter"):
        load_adapter(folder, cfg, 16)
    folder = copy_adapter(good, tmp_path / "device")
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.safetensors").symlink_to("/dev/zero")  # endless bytes, size 0
    with pytest.raises(AdapterError, match=r"no adapter_model\.safetensors"):
        load_adapter(folder, cfg, 16)
    folder = copy_adapter(good, tmp_path / "badjson")
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(folder, cfg, 16)
    folder = copy_adapter(good, tmp_path / "list")
    (folder / "adapter_config.json").write_text("[]")
    with pytest.raises(AdapterError, match="JSON object"):
        load_adapter(folder, cfg, 16)
    folder = copy_adapter(good, tmp_path / "huge")
    (folder / "adapter_config.json").write_text('{"r": 8, "pad": "' + "x" * (1 << 20) + '"}')
    with pytest.raises(AdapterError, match="larger than"):
        load_adapter(folder, cfg, 16)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"peft_type": "IA3"}, "IA3"),
        ({"r": 0}, "r must be"),
        ({"lora_alpha": "16"}, "lora_alpha must be"),
        ({"r": 4}, "disagrees"),
        ({"rank_pattern": ["q_proj"]}, "rank_pattern"),
        ({"alpha_pattern": {"(": 3}}, "not a module name"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ],
)
def test_bad_configs_are_refused(base: Path, good: Path, tmp_path: Path, changes, message) -> None:
    folder = copy_adapter(good, tmp_path / "cfg")
    edit_config(folder, **changes)
    with pytest.raises(AdapterError, match=message):
        load_adapter(folder, load_config(base), 16)


def test_bad_tensors_are_refused(base: Path, good: Path, tmp_path: Path) -> None:
    cfg = load_config(base)
    key_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    key_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    cases = [
        (lambda t: {k: v for k, v in t.items() if k != key_b}, "both be present"),
        (lambda t: t | {key_a: t[key_a].to(torch.int32)}, "only F16, BF16 and F32"),
        (lambda t: t | {key_b: torch.full_like(t[key_b], float("nan"))}, "NaN"),
        (lambda t: t | {key_a: t[key_a][:, :-1].contiguous()}, "do not fit"),
        (lambda t: t | {"base_model.model.lm_head.lora_A.weight": torch.zeros(8, 64)}, "not a LoRA A/B"),
        (
            lambda t: t | {"base_model.model.model.layers.0.self_attn.q_proj.bias": torch.zeros(64)},
            "not a LoRA A/B",
        ),
        (lambda t: {}, "holds no tensors"),
        (
            # PEFT's in-memory name: save_pretrained never writes it, so it is not a name we read.
            lambda t: t | {key_a.replace("lora_A.weight", "lora_A.default.weight"): t[key_a].clone()},
            "not a LoRA A/B",
        ),
    ]
    for i, (fn, message) in enumerate(cases):
        folder = copy_adapter(good, tmp_path / f"t{i}")
        edit_tensors(folder, fn)
        with pytest.raises(AdapterError, match=message):
            load_adapter(folder, cfg, 16)


def test_layer_specific_rank_pattern(base: Path, tmp_path: Path) -> None:
    folder = make_peft_adapter(
        base,
        tmp_path / "perlayer",
        r=8,
        alpha=16,
        target_modules=("q_proj",),
        rank_pattern={"model.layers.1.self_attn.q_proj": 2},
    )
    adapter = load_adapter(folder, load_config(base), 16)
    assert adapter.ranks[:, QKV].tolist() == [8, 2]
    raw = load_file(str(folder / "adapter_model.safetensors"))
    a1 = raw["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    assert a1.shape[0] == 2
    assert torch.equal(adapter.a["q_proj"][1, :2], a1)
    assert torch.count_nonzero(adapter.a["q_proj"][1, 2:]) == 0
    # rank 2 with alpha 16 scales by 8, 4x the adapter's 16/8: folded into layer 1's B only.
    b1 = raw["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    torch.testing.assert_close(adapter.b["q_proj"][1, :, :2], b1 * 4)
    b0 = raw["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    torch.testing.assert_close(adapter.b["q_proj"][0], b0)


# -- the fast path: one buffer, our own safetensors parser, NaN/Inf in the final values ------------------


def _safetensors(header: dict, data: bytes) -> bytearray:
    raw = json.dumps(header).encode()
    return bytearray(len(raw).to_bytes(8, "little") + raw + data)


def test_parser_never_accepts_what_safetensors_refuses() -> None:
    """Differential check against the reference parser on thousands of mutated files: whatever ours
    accepts, safetensors accepts too, with the same names, dtypes, shapes and values."""
    tensors = {"a": torch.randn(3, 5), "b.x": torch.randn(4).half(), "c": torch.randn(2, 2).bfloat16()}
    good = save(tensors, metadata={"format": "pt"})
    header_len = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + header_len])
    junk = [None, True, 1.5, -1, 0, "F32", "I8", [], {}, [1], [0, 76], [2, 2], [3, 5, 1], 2**70]
    rng = random.Random(7)
    accepted = refused = 0
    for _ in range(4000):
        kind = rng.random()
        if kind < 0.4:  # byte flips in the length field or the header
            data = bytearray(good)
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(8 + header_len)] = rng.choice(b'0123456789[]{},:" abcFBI-.e\x00\xff')
        elif kind < 0.75:  # a field of one entry replaced with a value of another type or size
            mutated = json.loads(json.dumps(header))
            entry = mutated[rng.choice(sorted(mutated))]
            entry[rng.choice([*sorted(entry), "extra"])] = rng.choice(junk)
            data = _safetensors(mutated, good[8 + header_len :])
        elif kind < 0.9:  # truncated or extended
            data = (
                bytearray(good[: rng.randrange(len(good))]) if rng.random() < 0.5 else bytearray(good + b"\0")
            )
        else:  # a header length that lies
            data = bytearray(good)
            data[:8] = max(0, header_len + rng.randint(-9, 9)).to_bytes(8, "little")
        try:
            ours = adapter_file.parse_safetensors(data)
        except AdapterError:
            refused += 1
            continue
        accepted += 1
        reference = safetensors_load(bytes(data))
        assert ours.keys() == reference.keys()
        for key, tensor in ours.items():
            assert tensor.dtype == reference[key].dtype and torch.equal(tensor, reference[key]), key
    assert accepted > 100 and refused > 1000  # both sides were exercised


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 15, "holds only"),
        (
            {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}},
            b"\0" * 17,
            "after the last tensor",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]},
            },
            b"\0" * 20,
            "gap",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12"),
        ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, b"\0" * 8, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, b"\0" * 8, "invalid data_offsets"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
        ({"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
        ({"a": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "only F16, BF16 and F32"),
        ({"a": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "must hold"),
        ({"__metadata__": {"format": 1}}, b"", "__metadata__"),
        ([1, 2], b"", "not a JSON object"),
    ],
)
def test_parser_refusals(header, data: bytes, message: str) -> None:
    with pytest.raises(AdapterError, match=message):
        adapter_file.parse_safetensors(_safetensors(header, data))


def test_parser_refuses_duplicate_names_and_lying_lengths() -> None:
    # Duplicate names: safetensors keeps one of them; a reader that picked the other would serve
    # different weights than the ones validated, so both are refused.
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    raw = ('{"a": ' + entry + ', "a": ' + entry + "}").encode()
    with pytest.raises(AdapterError, match="twice"):
        adapter_file.parse_safetensors(bytearray(len(raw).to_bytes(8, "little") + raw + b"\0" * 4))
    with pytest.raises(AdapterError, match="past the end"):
        adapter_file.parse_safetensors(bytearray((1 << 10).to_bytes(8, "little") + b"{}"))
    with pytest.raises(AdapterError, match="at most 524288"):  # the cap is checked before anything is read
        adapter_file.parse_safetensors(bytearray((1 << 40).to_bytes(8, "little") + b"{}"))
    with pytest.raises(AdapterError, match="8-byte"):
        adapter_file.parse_safetensors(bytearray(b"\x02\0\0"))


def test_parser_reads_misaligned_tensors_exactly() -> None:
    """An F32 tensor may start at an odd offset (after an F16 one); it is read exactly, into aligned memory."""
    h = torch.tensor([1.5], dtype=torch.float16)
    a = torch.randn(5)
    data = bytes(h.untyped_storage()) + bytes(a.untyped_storage()) + bytes(h.untyped_storage())
    header = {
        "h": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]},
        "a": {"dtype": "F32", "shape": [5], "data_offsets": [2, 22]},
        "z": {"dtype": "F16", "shape": [1], "data_offsets": [22, 24]},
    }
    out = adapter_file.parse_safetensors(_safetensors(header, data))
    assert torch.equal(out["a"], a) and out["a"].data_ptr() % 4 == 0
    assert torch.equal(out["h"], h) and torch.equal(out["z"], h)


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_one_buffer_in_the_target_dtype(base: Path, good: Path, tmp_path: Path, file_dtype, dtype) -> None:
    cfg = load_config(base)
    folder = copy_adapter(good, tmp_path / "cast")
    edit_tensors(folder, lambda t: {k: v.to(file_dtype) for k, v in t.items()})
    adapter = load_adapter(folder, cfg, 16, dtype)
    raw = load_file(str(folder / "adapter_model.safetensors"))
    storages = {t.untyped_storage().data_ptr() for t in (*adapter.a.values(), *adapter.b.values())}
    assert storages == {adapter.ranks.untyped_storage().data_ptr()}  # A, B and ranks share one buffer
    for layer in range(cfg.num_layers):
        for module in ALL_TARGETS:
            parent = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{parent}.{module}.lora_"
            assert adapter.a[module].dtype == dtype
            assert torch.equal(adapter.a[module][layer], raw[key + "A.weight"].to(dtype))
            assert torch.equal(adapter.b[module][layer], raw[key + "B.weight"].to(dtype))
    assert (adapter.ranks == 8).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 37, -1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nan_and_inf_anywhere_are_refused(
    base: Path, good: Path, tmp_path: Path, value, where, dtype
) -> None:
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"

    def poison(t: dict) -> dict:
        bad = t[key].clone()
        bad.view(-1)[where] = value
        return t | {key: bad.to(dtype)}

    folder = copy_adapter(good, tmp_path / "poisoned")
    edit_tensors(folder, poison)
    with pytest.raises(AdapterError, match="layer 1 down_proj: weights hold NaN or infinity"):
        load_adapter(folder, load_config(base), 16, torch.bfloat16)


def test_values_that_overflow_the_target_dtype_are_refused(base: Path, good: Path, tmp_path: Path) -> None:
    """Finite in the file, infinite once narrowed: served as fp16 it would be inf, so it is refused."""
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    folder = copy_adapter(good, tmp_path / "big")
    edit_tensors(folder, lambda t: t | {key: t[key] * 0 + 1e6})
    cfg = load_config(base)
    assert load_adapter(folder, cfg, 16, torch.float32).b["q_proj"].max() == 1e6
    with pytest.raises(AdapterError, match="layer 0 q_proj: weights hold NaN or infinity"):
        load_adapter(folder, cfg, 16, torch.float16)


def test_forged_and_malformed_file_is_named_as_forged(base: Path, good: Path, tmp_path: Path) -> None:
    folder = copy_adapter(good, tmp_path / "forged")
    (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(AdapterError, match="does not match") as info:
        load_adapter(folder, load_config(base), 16, expected_hash="0" * 64)
    assert "not a readable safetensors" in str(info.value.__cause__)


def test_file_that_grows_while_read_is_refused(
    base: Path, good: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read is bounded by the size seen when the file was opened: more bytes than that means the
    file changed under us (or lies about its size), and nothing of it is used."""
    real_fstat = os.fstat

    def shrunk(fd: int):
        st = real_fstat(fd)
        return os.stat_result((*st[:6], st.st_size - 100, *st[7:]))

    monkeypatch.setattr(adapter_file.os, "fstat", shrunk)
    with pytest.raises(AdapterError, match="changed while it was read"):
        load_adapter(good, load_config(base), 16)
