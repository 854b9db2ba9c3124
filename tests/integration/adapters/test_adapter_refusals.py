"""Every refusal of the upload route: the error envelope names the reason, and nothing is left behind."""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
from pathlib import Path

import torch
from safetensors.torch import save

MAX_RANK = 16


def _header(weights: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", weights[:8])
    return json.loads(weights[8 : 8 + length]), weights[8 + length :]


def _with_header(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _retensor(weights: bytes, edit) -> bytes:
    tensors = load_file_bytes(weights)
    edit(tensors)
    return save(tensors, metadata={"format": "pt"})


def load_file_bytes(weights: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return dict(load(weights))


class WritesAFile:
    """A pickle that, if anything ever unpickled it, would create `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled!"))


def test_every_refusal_names_its_reason_and_leaves_nothing(
    app, client, admin_headers, make_tenant, make_adapter, upload, s3_keys, tmp_path
):
    tenant = make_tenant()
    good = make_adapter(r=4)
    weights = (good / "adapter_model.safetensors").read_bytes()
    config = json.loads((good / "adapter_config.json").read_text())
    marker = tmp_path / "pwned"
    evil = pickle.dumps(WritesAFile(marker))
    torch_zip = io.BytesIO()
    torch.save({"w": WritesAFile(marker)}, torch_zip)
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as archive:
        archive.add(good / "adapter_model.safetensors", arcname="adapter_model.safetensors")
    header, data = _header(weights)
    names = [k for k in header if k != "__metadata__"]
    overlapping = json.loads(json.dumps(header))
    overlapping[names[1]]["data_offsets"][0] -= 4
    overlapping[names[1]]["data_offsets"][1] -= 4
    a_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def nan(t):
        t[a_key][0, 0] = float("nan")

    cases = [
        # (what, upload kwargs, status, code, param)
        ("pickle named .bin", {"weights": evil, "weights_name": "adapter_model.bin"}, 415, "pickle_refused", "weights"),
        ("pickle named .safetensors", {"weights": evil}, 415, "pickle_refused", "weights"),
        ("pickle as the config", {"config": evil}, 415, "pickle_refused", "adapter_config"),
        ("torch.save zip", {"weights": torch_zip.getvalue()}, 415, "archive_refused", "weights"),
        ("torch.save zip named .pt", {"weights": torch_zip.getvalue(), "weights_name": "a.pt"}, 415, "pickle_refused", "weights"),
        ("tar archive", {"weights": tar.getvalue()}, 415, "archive_refused", "weights"),
        ("zip file name", {"weights_name": "adapter.zip"}, 415, "archive_refused", "weights"),
        ("truncated", {"weights": weights[:-10]}, 422, "truncated_file", "weights"),
        ("trailing bytes", {"weights": weights + b"\x00" * 8}, 422, "trailing_bytes", "weights"),
        ("header past the end", {"weights": struct.pack("<Q", 10_000) + b"{}"}, 422, "header_past_end", "weights"),
        ("header over the cap", {"weights": struct.pack("<Q", 2**40) + b"{}"}, 422, "header_too_large", "weights"),
        ("overlapping offsets", {"weights": _with_header(overlapping, data)}, 422, "bad_offsets", "weights"),
        ("shape mismatch", {"weights": _retensor(weights, lambda t: t.update({a_key: torch.zeros(4, 96)}))}, 422, "shape_mismatch", "weights"),
        ("another architecture", {"weights": _retensor(weights, lambda t: t.update({a_key.replace("layers.0", "layers.7"): torch.zeros(4, 64)}))}, 422, "wrong_architecture", "weights"),
        ("rank too high", {"weights": (make_adapter(r=32) / "adapter_model.safetensors").read_bytes(), "config": json.dumps({**config, "r": 32}).encode()}, 422, "rank_too_high", "adapter_config"),
        ("NaN", {"weights": _retensor(weights, nan)}, 422, "non_finite_values", "weights"),
        ("int8 weights", {"weights": _retensor(weights, lambda t: t.update({k: v.to(torch.int8) for k, v in t.items()}))}, 422, "dtype_refused", "weights"),
        ("missing tensor", {"weights": _retensor(weights, lambda t: t.pop(a_key))}, 422, "missing_tensor", "weights"),
        ("extra tensor", {"weights": _retensor(weights, lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}))}, 422, "unexpected_tensor", "weights"),
        ("DoRA", {"config": json.dumps({**config, "use_dora": True}).encode()}, 422, "use_dora_refused", "adapter_config"),
        ("modules_to_save", {"config": json.dumps({**config, "modules_to_save": ["lm_head"]}).encode()}, 422, "modules_to_save_refused", "adapter_config"),
        ("rank_pattern the tensors do not have", {"config": json.dumps({**config, "rank_pattern": {"q_proj": 2}}).encode()}, 422, "shape_mismatch", "weights"),
        ("alpha 1e308", {"config": json.dumps({**config, "lora_alpha": 1e308}).encode()}, 422, "invalid_alpha", "adapter_config"),
        ("alpha 10**400", {"config": json.dumps({**config, "lora_alpha": 10**400}).encode()}, 422, "invalid_alpha", "adapter_config"),
        ("alpha NaN", {"config": json.dumps({**config, "lora_alpha": float("nan")}).encode()}, 422, "malformed_config", "adapter_config"),
        ("alpha_pattern 1e308", {"config": json.dumps({**config, "alpha_pattern": {"q_proj": 1e308}}).encode()}, 422, "invalid_alpha", "adapter_config"),
        ("rank_pattern 10**400", {"config": json.dumps({**config, "rank_pattern": {"q_proj": 10**400}}).encode()}, 422, "rank_too_high", "adapter_config"),
        ("bias", {"config": json.dumps({**config, "bias": "lora_only"}).encode()}, 422, "bias_refused", "adapter_config"),
        ("not LoRA", {"config": json.dumps({**config, "peft_type": "PREFIX_TUNING"}).encode()}, 422, "unsupported_peft_type", "adapter_config"),
        ("config not JSON", {"config": b"r: 8\n"}, 422, "malformed_config", "adapter_config"),
        ("config over 1 MiB", {"config": b" " * (1024 * 1024 + 1)}, 413, "config_too_large", "adapter_config"),
    ]  # fmt: skip
    for what, kwargs, status, code, param in cases:
        response = upload(tenant["id"], "victim", good, **kwargs)
        assert response.status_code == status, (what, response.text)
        error = response.json()["error"]
        assert (error["code"], error["param"]) == (code, param), (what, error)
        assert error["message"] and error["type"] == "invalid_request_error", what

    assert not marker.exists(), "a pickle was unpickled"
    listed = client.get(f"/admin/tenants/{tenant['id']}/adapters", headers=admin_headers).json()
    assert listed == {"data": [], "total": 0}
    assert s3_keys(f"adapters/{tenant['id']}/") == []
    uploads = tmp_path / "data" / "uploads"
    assert not uploads.exists() or list(uploads.iterdir()) == []
    # The route still works after all that.
    assert upload(tenant["id"], "victim", good).status_code == 201


def test_names_are_checked(app, make_tenant, make_adapter, upload):
    tenant = make_tenant()
    good = make_adapter(r=4)
    bad_names = [
        "Bad",
        "-lead",
        ".dot",
        "a" * 65,
        "x/y",
        "",
        "caf\u00e9",
        "a b",
        "0b6e1c9a-2fa1-41d2-883f-0016d3cca427",
    ]
    for name in bad_names:
        response = upload(tenant["id"], name, good)
        assert response.status_code in (400, 422), (name, response.text)
        assert response.json()["error"]["param"] == "name", name
    for name in ("a", "x" * 64, "support.bot_v2-final", "7b"):
        assert upload(tenant["id"], name, good).status_code == 201, name


def _multipart(boundary: str, parts: list[tuple[str, str | None, bytes]]) -> bytes:
    out = b""
    for name, filename, body in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + body + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_malformed_forms(app, client, admin_headers, make_tenant, make_adapter, monkeypatch, tmp_path):
    tenant = make_tenant()
    good = make_adapter(r=4)
    config = (good / "adapter_config.json").read_bytes()
    weights = (good / "adapter_model.safetensors").read_bytes()
    url = f"/admin/tenants/{tenant['id']}/adapters"
    b = "xyzBOUNDARY"
    form = {"Content-Type": f"multipart/form-data; boundary={b}", **admin_headers}
    cases = [
        ("json body", {"content": b"{}", "headers": {**admin_headers, "Content-Type": "application/json"}}, 415, "unsupported_media_type"),
        ("no boundary", {"content": b"", "headers": {**admin_headers, "Content-Type": "multipart/form-data"}}, 415, "unsupported_media_type"),
        ("missing weights", {"content": _multipart(b, [("name", None, b"x"), ("adapter_config", "c.json", config)]), "headers": form}, 400, "missing_field"),
        ("weights as text", {"content": _multipart(b, [("name", None, b"x"), ("adapter_config", "c.json", config), ("weights", None, weights)]), "headers": form}, 400, "file_expected"),
        ("twice", {"content": _multipart(b, [("name", None, b"x"), ("name", None, b"y")]), "headers": form}, 400, "duplicate_field"),
        ("unknown field", {"content": _multipart(b, [("extra", None, b"x")]), "headers": form}, 400, "unexpected_field"),
        ("cut short", {"content": _multipart(b, [("name", None, b"x")])[:-10], "headers": form}, 400, "malformed_multipart"),
        ("huge name", {"content": _multipart(b, [("name", None, b"x" * 5000)]), "headers": form}, 400, "field_too_large"),
    ]  # fmt: skip
    for what, kwargs, status, code in cases:
        response = client.post(url, **kwargs)
        assert response.status_code == status, (what, response.text)
        assert response.json()["error"]["code"] == code, (what, response.text)

    # Field order does not matter.
    reverse = [
        ("weights", "adapter_model.safetensors", weights),
        ("adapter_config", "c.json", config),
        ("name", None, b"ok"),
    ]
    made = client.post(url, content=_multipart(b, reverse), headers=form)
    assert made.status_code == 201 and made.json()["name"] == "ok", made.text

    # Random garbage in every field: always a 4xx in the envelope, never a 5xx.
    import random

    rng = random.Random(7)
    pieces = [b"", b"{", b"\x80\x04", b"PK\x03\x04", config, weights[:64], weights, b"\x00" * 9, b"{}" * 50]
    for _ in range(25):
        parts = [
            ("name", None, rng.choice([b"bot", b"", b"\xff\xfe", b"a" * 70, b"../x"])),
            (
                "adapter_config",
                rng.choice(["c.json", "c.pt", "c"]),
                rng.choice(pieces) + rng.randbytes(rng.randrange(0, 40)),
            ),
            (
                "weights",
                rng.choice(["w.safetensors", "w.bin", "w"]),
                rng.choice(pieces) + rng.randbytes(rng.randrange(0, 40)),
            ),
        ]
        rng.shuffle(parts)
        response = client.post(url, content=_multipart(b, parts[: rng.randint(1, 3)]), headers=form)
        assert 400 <= response.status_code < 500, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    # A full disk while receiving: 503 (retry later), and no half-written upload stays behind.
    from app.domain.adapters import upload as upload_module

    def disk_full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(upload_module._Part, "write_pending", disk_full)
    full = client.post(url, content=_multipart(b, reverse), headers=form)
    assert full.status_code == 503 and full.json()["error"]["code"] == "insufficient_storage"
    assert list((tmp_path / "data" / "uploads").iterdir()) == []


def test_size_limit_is_413_with_or_without_content_length(
    build_app, store_settings, base_dir, make_adapter, tmp_path
):
    import shutil

    from litestar.testing import TestClient

    from tests.integration.conftest import TEST_ADMIN_KEY

    demo = tmp_path / "data" / "demo-model"
    demo.mkdir(parents=True)
    shutil.copy(base_dir / "config.json", demo / "config.json")
    app = build_app(max_upload_bytes=4096, **store_settings)
    good = make_adapter(r=4)  # about 10 KB of weights
    headers = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}
    b = "sizeBOUNDARY"
    body = _multipart(
        b,
        [
            ("name", None, b"big"),
            ("adapter_config", "adapter_config.json", (good / "adapter_config.json").read_bytes()),
            ("weights", "adapter_model.safetensors", (good / "adapter_model.safetensors").read_bytes()),
        ],
    )
    with TestClient(app) as client:
        tenant = client.post("/admin/tenants", json={"name": "sized"}, headers=headers).json()
        url = f"/admin/tenants/{tenant['id']}/adapters"
        form = {**headers, "Content-Type": f"multipart/form-data; boundary={b}"}
        with_length = client.post(url, content=body, headers=form)
        assert with_length.status_code == 413 and with_length.json()["error"]["code"] == "upload_too_large"

        def chunks():
            for start in range(0, len(body), 1000):
                yield body[start : start + 1000]

        streamed = client.post(url, content=chunks(), headers=form)  # chunked: no Content-Length
        assert streamed.status_code == 413, streamed.text
        assert streamed.json()["error"]["code"] == "upload_too_large"
        assert client.get(url, headers=headers).json()["total"] == 0
    assert list((tmp_path / "data" / "uploads").iterdir()) == []


def test_no_base_model_is_503_before_the_body_is_read(build_app, store_settings, make_adapter, tmp_path):
    from litestar.testing import TestClient

    from tests.integration.conftest import TEST_ADMIN_KEY

    app = build_app(model=str(tmp_path / "no-such-model"), **store_settings)
    headers = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}
    folder = make_adapter(r=4)
    files = {
        "adapter_config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
        "weights": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes()),
    }
    with TestClient(app) as client:
        tenant = client.post("/admin/tenants", json={"name": "nomodel"}, headers=headers).json()
        response = client.post(
            f"/admin/tenants/{tenant['id']}/adapters", data={"name": "bot"}, files=files, headers=headers
        )
    assert response.status_code == 503 and response.json()["error"]["code"] == "model_unavailable"
