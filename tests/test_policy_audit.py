"""The site's egress policy and audit log: what may leave a hospital, and the record of what did."""

import hashlib
import json
import os
import re
import stat

import pytest
import torch
from rich.console import Console

from fedmusk.client.audit import GENESIS, AuditLog, AuditLogTampered, summarize
from fedmusk.client.policy import EgressRefused, SitePolicy, SitePolicyConfig
from fedmusk.config import ConfigError
from fedmusk.strategies import state_norm

LORA_A = "beit3.encoder.layers.0.self_attn.q_proj.B.lora_A.weight"
LORA_B = "beit3.encoder.layers.0.self_attn.q_proj.B.lora_B.weight"
HEAD = "task_heads.fusion.gate.weight"
BASE = "beit3.encoder.layers.0.self_attn.q_proj.B.weight"
EMBED = "beit3.text_embed.weight"
# A value that would be easy to spot if it ever appeared in a message or a log line.
MARKER = 0.123456789


def update(scale: float = 0.01, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        LORA_A: (scale * torch.randn(8, 32, generator=g)).to(dtype),
        LORA_B: (scale * torch.randn(32, 8, generator=g)).to(dtype),
        HEAD: (scale * torch.randn(4, 16, generator=g)).to(dtype),
    }


def policy(tmp_path, **settings) -> SitePolicy:
    return SitePolicy(SitePolicyConfig(**settings), tmp_path)


def write_policy(tmp_path, text: str):
    path = tmp_path / "site-policy.yaml"
    path.write_text(text)
    return path


# --- the policy ----------------------------------------------------------------------------------------------


def test_site_policy_sends_lora_factors_and_task_heads_as_they_are(tmp_path):
    sent = policy(tmp_path).enforce(update(), round=1)
    assert list(sent) == [LORA_A, LORA_B, HEAD]
    assert all(torch.equal(sent[k], v) for k, v in update().items())


def test_site_policy_refuses_base_weights_and_names_them(tmp_path):
    with pytest.raises(EgressRefused) as refused:
        policy(tmp_path).enforce({**update(), BASE: torch.zeros(32, 32), "logit_scale": torch.zeros(())}, round=2)
    assert BASE in str(refused.value) and "logit_scale" in str(refused.value)
    assert len(refused.value.reasons) == 2 and all("base weight" in r for r in refused.value.reasons)
    assert refused.value.round == 2


def test_site_policy_refused_patterns_win_over_a_widened_allowlist(tmp_path):
    with pytest.raises(EgressRefused) as refused:
        policy(tmp_path, allowed_tensors=[".*"]).enforce({**update(), EMBED: torch.zeros(10, 4)}, round=1)
    assert [r.split(":")[0] for r in refused.value.reasons] == [EMBED]


def test_site_policy_refuses_names_outside_a_narrowed_allowlist(tmp_path):
    language_only = policy(tmp_path, allowed_tensors=[r".+\.B\.lora_[AB]\.weight"])
    with pytest.raises(EgressRefused) as refused:
        language_only.enforce(update(), round=1)
    assert refused.value.reasons == [f"{HEAD}: not in allowed_tensors"]


def test_site_policy_accepts_a_real_musk_adapter_and_refuses_every_base_weight(tmp_path):
    from fedmusk.musk_model import MuskConfig, MuskModel
    from fedmusk.musk_model.heads import GatedAttentionMIL
    from fedmusk.musk_model.lora import LoraSettings, adapter_state, apply_lora

    cfg = MuskConfig.tiny()
    base = MuskModel(cfg)
    base_names = set(base.state_dict())
    model = apply_lora(base, LoraSettings(), {"mil": GatedAttentionMIL(cfg.embed_dim, hidden=8)})
    adapter = adapter_state(model)
    assert set(policy(tmp_path).enforce(adapter, round=1)) == set(adapter)
    base_state = MuskModel(cfg).state_dict()
    with pytest.raises(EgressRefused) as refused:
        policy(tmp_path, max_update_norm=None, max_bytes_per_round=None).enforce(base_state, round=1)
    assert {r.split(":")[0] for r in refused.value.reasons} == base_names


def test_site_policy_refuses_bfloat16(tmp_path):
    with pytest.raises(EgressRefused) as refused:
        policy(tmp_path).enforce(update(dtype=torch.bfloat16), round=1)
    assert len(refused.value.reasons) == 3 and all("bfloat16" in r for r in refused.value.reasons)
    assert policy(tmp_path).enforce(update(dtype=torch.float16), round=1)[LORA_A].dtype == torch.float16


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_site_policy_refuses_non_finite_values(tmp_path, bad):
    poisoned = update()
    poisoned[LORA_B][3, 1] = bad
    with pytest.raises(EgressRefused) as refused:
        policy(tmp_path).enforce(poisoned, round=1)
    assert refused.value.reasons == [f"{LORA_B}: has NaN or infinite values"]


def test_site_policy_refuses_an_update_over_the_norm_limit_without_revealing_the_norm(tmp_path):
    big = update(scale=10.0)
    with pytest.raises(EgressRefused) as refused:
        policy(tmp_path, max_update_norm=1.0).enforce(big, round=1)
    assert "max_update_norm 1.0" in str(refused.value)
    assert f"{state_norm(big):.2f}" not in str(refused.value)


def test_site_policy_clips_an_update_over_the_norm_limit_when_set_to_clip(tmp_path):
    big = update(scale=10.0)
    sent = policy(tmp_path, max_update_norm=1.0, on_norm_exceeded="clip").enforce(big, round=1)
    assert state_norm(sent) == pytest.approx(1.0, rel=1e-5)
    scale = sent[LORA_A].flatten()[0] / big[LORA_A].flatten()[0]
    assert all(torch.allclose(sent[k], v * scale) for k, v in big.items())  # one factor for the whole update
    small = update(scale=1e-3)
    assert all(torch.equal(policy(tmp_path, on_norm_exceeded="clip").enforce(small, 1)[k], small[k]) for k in small)


def test_site_policy_adds_local_noise_with_the_configured_std(tmp_path):
    zeros = {LORA_A: torch.zeros(200, 500), HEAD: torch.zeros(100)}
    noisy = policy(tmp_path, local_dp_std=0.05, max_update_norm=None)
    sent = noisy.enforce(zeros, round=1, generator=torch.Generator().manual_seed(1))
    assert sent[LORA_A].std().item() == pytest.approx(0.05, rel=0.02)
    assert abs(sent[LORA_A].mean().item()) < 0.002
    assert not torch.equal(noisy.enforce(zeros, round=1)[LORA_A], noisy.enforce(zeros, round=1)[LORA_A])
    assert torch.equal(zeros[LORA_A], torch.zeros(200, 500))  # the caller's tensors are untouched


def test_site_policy_refuses_updates_over_the_byte_limit(tmp_path):
    with pytest.raises(EgressRefused, match="update is 2304 bytes, over max_bytes_per_round 1000"):
        policy(tmp_path, max_bytes_per_round=1000).enforce(update(), round=1)


def test_site_policy_sends_only_to_listed_recipients(tmp_path):
    listed = policy(tmp_path, allowed_recipients=["consortium"])
    assert listed.enforce(update(), round=1, recipient="consortium")
    for stranger in ("someone-else", None):
        with pytest.raises(EgressRefused, match="not in allowed_recipients"):
            listed.enforce(update(), round=1, recipient=stranger)
    assert policy(tmp_path).enforce(update(), round=1, recipient="anyone")


def test_refusal_messages_never_contain_tensor_values(tmp_path):
    bad = {BASE: torch.full((4,), MARKER), LORA_A: torch.full((2,), MARKER, dtype=torch.bfloat16)}
    bad[LORA_B] = torch.tensor([MARKER, float("nan")])
    with pytest.raises(EgressRefused) as refused:
        policy(tmp_path, max_update_norm=1e-3).enforce(bad, round=1)
    assert "0.123" not in str(refused.value) and "0.123" not in " ".join(refused.value.reasons)


def test_site_policy_file_rejects_unknown_keys_by_name(tmp_path):
    path = write_policy(tmp_path, "site_name: Hospital A\nmax_update_nrom: 10\n")
    with pytest.raises(ConfigError, match="unknown configuration key 'max_update_nrom'"):
        SitePolicy.load(path)


@pytest.mark.parametrize(
    "line, key",
    [
        ("on_norm_exceeded: shrink", "on_norm_exceeded"),
        ("local_dp_std: -1", "local_dp_std"),
        ("refused_tensors: ['lora_[A']", "refused_tensors[0]"),
        ("site_name: 'bad\\nname'", "site_name"),
        ("max_update_norm: many", "max_update_norm"),
    ],
)
def test_site_policy_file_rejects_bad_values_by_name(tmp_path, line, key):
    with pytest.raises(ConfigError, match=re.escape(f"site-policy.yaml: bad value for '{key}'")):
        SitePolicy.load(write_policy(tmp_path, line + "\n"))


def test_site_policy_file_sets_name_audit_log_and_limits(tmp_path):
    path = write_policy(tmp_path, "site_name: Hospital A\naudit_log: logs/audit.jsonl\nmax_update_norm: null\n")
    loaded = SitePolicy.load(path, site_root=tmp_path / "site")
    assert loaded.site_name == "Hospital A" and loaded.config.max_update_norm is None
    assert loaded.audit_log_path == tmp_path / "logs" / "audit.jsonl"
    default = SitePolicy.default(tmp_path / "Hospital_B")
    assert default.site_name == "Hospital_B"
    assert default.audit_log_path == tmp_path / "Hospital_B" / ".fedmusk" / "audit.jsonl"


def test_example_site_policy_is_the_default_policy():
    example = SitePolicy.load("configs/site-policy.example.yaml")
    assert example.config == SitePolicyConfig(site_name="Hospital A")


# --- the audit log -------------------------------------------------------------------------------------------


def raw_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def test_audit_log_records_each_send_with_sha256_and_bytes_but_no_values(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    tensors = {LORA_A: torch.full((8, 32), MARKER), HEAD: torch.full((3,), MARKER, dtype=torch.float16)}
    entry = log.record_send("run-1", 4, "consortium", tensors)
    assert entry == log.entries()[0]
    assert entry["event"] == "send" and entry["round"] == 4 and entry["recipient"] == "consortium"
    assert entry["time"].endswith("Z") and entry["prev_sha256"] == GENESIS
    assert entry["tensors"] == [
        {"name": LORA_A, "shape": [8, 32], "dtype": "float32", "bytes": 1024, "sha256": raw_sha256(tensors[LORA_A])},
        {"name": HEAD, "shape": [3], "dtype": "float16", "bytes": 6, "sha256": raw_sha256(tensors[HEAD])},
    ]
    assert entry["total_bytes"] == 1030
    assert "0.123" not in (tmp_path / "audit.jsonl").read_text()


def test_audit_log_file_is_created_private(tmp_path):
    before = os.umask(0)
    try:
        AuditLog(tmp_path / ".fedmusk" / "audit.jsonl").record_refusal("run-1", 1, None, ["x: not allowed"])
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / ".fedmusk" / "audit.jsonl").stat().st_mode) == 0o600


def filled_log(tmp_path, n: int = 4) -> AuditLog:
    log = AuditLog(tmp_path / "audit.jsonl")
    for r in range(1, n + 1):
        log.record_send("run-1", r, "consortium", update(scale=r))
    return log


def test_audit_log_only_appends(tmp_path):
    log = filled_log(tmp_path, 2)
    before = log.path.read_bytes()
    log.record_refusal("run-1", 3, "consortium", [f"{BASE}: refused"])
    after = log.path.read_bytes()
    assert after.startswith(before) and after.count(b"\n") == 3
    assert [e["seq"] for e in log.entries()] == [1, 2, 3]
    assert log.verify()


def test_audit_log_chain_detects_an_edited_line(tmp_path):
    log = filled_log(tmp_path)
    lines = log.path.read_bytes().splitlines(keepends=True)
    entry = json.loads(lines[1])
    entry["tensors"] = entry["tensors"][:1]  # hide that some tensors were sent
    lines[1] = json.dumps(entry, separators=(",", ":")).encode() + b"\n"
    log.path.write_bytes(b"".join(lines))
    with pytest.raises(AuditLogTampered, match="line 3: prev_sha256") as tampered:
        log.verify()
    assert tampered.value.line == 3


def test_audit_log_chain_detects_a_deleted_line(tmp_path):
    log = filled_log(tmp_path)
    lines = log.path.read_bytes().splitlines(keepends=True)
    log.path.write_bytes(b"".join(lines[:1] + lines[2:]))
    with pytest.raises(AuditLogTampered, match="line 2"):
        log.verify()


def test_audit_log_remembered_head_detects_lines_cut_from_the_end(tmp_path):
    log = filled_log(tmp_path)
    head = log.head()
    assert log.verify(expected_head=head)
    lines = log.path.read_bytes().splitlines(keepends=True)
    log.path.write_bytes(b"".join(lines[:-1]))
    with pytest.raises(AuditLogTampered, match="stored"):
        log.verify()  # a shorter chain is still a chain, but not the one whose head was stored beside it...
    log.head_path.unlink()
    assert log.verify()
    with pytest.raises(AuditLogTampered, match="expected head"):
        log.verify(expected_head=head)  # ...nor the one whose head was noted elsewhere


def test_audit_log_refuses_to_append_after_a_torn_last_line(tmp_path):
    log = filled_log(tmp_path, 1)
    with open(log.path, "ab") as f:
        f.write(b'{"seq": 2, "ev')
    with pytest.raises(AuditLogTampered, match="line 2: last line is incomplete"):
        log.record_send("run-1", 2, None, update())


def test_audit_summary_lists_entries_and_flags_tampering(tmp_path):
    log = filled_log(tmp_path, 2)
    log.record_refusal("run-1", 3, "consortium", [f"{BASE}: refused by refused_tensors[0]"])

    def render() -> str:
        console = Console(record=True, width=200, file=open(os.devnull, "w"))
        console.print(summarize(tmp_path))  # a site folder: the default log path under it is read
        return console.export_text()

    (tmp_path / ".fedmusk").mkdir()
    log.path.rename(tmp_path / ".fedmusk" / "audit.jsonl")
    text = render()
    assert "hash chain intact" in text and "refusal" in text and BASE in text and "2,304" in text
    moved = tmp_path / ".fedmusk" / "audit.jsonl"
    moved.write_bytes(moved.read_bytes().replace(b'"round":1', b'"round":9'))
    assert "TAMPERED" in render() and "line 2" in render()


def test_audit_log_detects_an_edited_last_line_by_its_stored_head(tmp_path):
    log = filled_log(tmp_path, 2)
    data = log.path.read_bytes()
    log.path.write_bytes(data[: data.rstrip(b"\n").rfind(b"\n") + 1] + data.splitlines()[-1].replace(
        b'"round":2', b'"round":7') + b"\n")  # fmt: skip
    with pytest.raises(AuditLogTampered, match="line 2: the last line does not match the head stored"):
        log.verify()


def _audit(*args: str):
    from typer.testing import CliRunner

    from fedmusk.cli import app

    result = CliRunner().invoke(app, ["audit", *args], terminal_width=400)
    result.text = " ".join(result.output.split())  # the table wraps long lines
    return result


def test_audit_command_exits_non_zero_on_tampering_missing_or_empty_logs_and_prints_the_whole_head(tmp_path):
    log = filled_log(tmp_path, 2)
    intact = _audit(str(log.path))
    assert intact.exit_code == 0 and log.head() in intact.text
    assert _audit(str(log.path), "--head", log.head()).exit_code == 0
    assert _audit(str(log.path), "--head", "f" * 64).exit_code == 1  # a head the site noted that is not there

    log.path.write_bytes(log.path.read_bytes().replace(b'"round":1', b'"round":9'))
    tampered = _audit(str(log.path))
    assert tampered.exit_code == 1 and "TAMPERED" in tampered.text and "line 2" in tampered.text

    wrong = _audit(str(tmp_path / "no-such-site"))
    assert wrong.exit_code == 1 and "does not exist" in wrong.text
    (tmp_path / "site").mkdir()
    missing = _audit(str(tmp_path / "site"))
    assert missing.exit_code == 1 and "NO AUDIT LOG" in missing.text
    log.path.write_bytes(b"")
    emptied = _audit(str(log.path))
    assert emptied.exit_code == 1 and "EMPTY" in emptied.text
    for result in (tampered, wrong, missing, emptied):
        assert "Traceback" not in result.output
