"""Reasoning-effort profiles: the 04-24 preview and the -0731/-0813 refresh, per checkpoint (issue 9)."""

from __future__ import annotations

import jinja2
import pytest

from v4_plugin.text.chat import (ABSOLUTE_MAXIMUM_PREAMBLE, ASSISTANT, BEYOND_MAXIMUM_PREAMBLE, BOS, PREVIEW_PROFILE,
                            PROFILE_ENV, REFRESH_PROFILE, THINK_END, THINK_START, USER, build_chat_template,
                            detect_profile, encode_messages, encode_request)

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]

# (profile, effort) -> the preamble written right after BOS in thinking mode; written out by hand from
# refresh-checkpoints.md §4, not computed from the profile objects.
EXPECTED = {
    ("preview", None): "", ("preview", "high"): "", ("preview", "max"): ABSOLUTE_MAXIMUM_PREAMBLE,
    ("refresh", None): ABSOLUTE_MAXIMUM_PREAMBLE, ("refresh", "low"): "",
    ("refresh", "high"): ABSOLUTE_MAXIMUM_PREAMBLE, ("refresh", "max"): BEYOND_MAXIMUM_PREAMBLE,
}
PROFILES = {"preview": PREVIEW_PROFILE, "refresh": REFRESH_PROFILE}


def _template(profile):
    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(ValueError(msg))
    return env.from_string(build_chat_template(profile))


@pytest.mark.parametrize("profile,effort", list(EXPECTED))
@pytest.mark.parametrize("thinking", [True, False])
def test_preamble_text_and_position(profile, effort, thinking):
    prompt = encode_messages(MESSAGES, thinking=thinking, reasoning_effort=effort, profile=PROFILES[profile])
    preamble = EXPECTED[(profile, effort)] if thinking else ""
    opener = THINK_START if thinking else THINK_END
    assert prompt == BOS + preamble + "Be brief." + USER + "Hi" + ASSISTANT + opener
    rendered = _template(PROFILES[profile]).render(messages=MESSAGES, add_generation_prompt=True, thinking=thinking,
                                                   reasoning_effort=effort)
    assert rendered == prompt


def test_beyond_maximum_is_the_refresh_max_text():
    assert BEYOND_MAXIMUM_PREAMBLE.startswith("Reasoning Effort: Beyond maximum")
    assert ABSOLUTE_MAXIMUM_PREAMBLE.startswith("Reasoning Effort: Absolute maximum")


@pytest.mark.parametrize("profile,bad,allowed", [("preview", "ultra", "high, max"), ("refresh", "ultra", "high, low, max")])
def test_unknown_effort_lists_the_allowed_values(profile, bad, allowed):
    with pytest.raises(ValueError, match="expected one of"):
        encode_messages(MESSAGES, thinking=True, reasoning_effort=bad, profile=PROFILES[profile])
    with pytest.raises(ValueError, match=allowed):
        _template(PROFILES[profile]).render(messages=MESSAGES, add_generation_prompt=True, thinking=True,
                                            reasoning_effort=bad)


def test_detection(tmp_path, monkeypatch):
    monkeypatch.delenv(PROFILE_ENV, raising=False)
    assert detect_profile(tmp_path, dspark=False) is PREVIEW_PROFILE
    assert detect_profile(tmp_path, dspark=True) is REFRESH_PROFILE
    (tmp_path / "encoding").mkdir()
    bundled = tmp_path / "encoding" / "encoding_dsv4.py"
    bundled.write_text('REASONING_EFFORT_MAX = "..."\n')
    assert detect_profile(tmp_path, dspark=True) is PREVIEW_PROFILE  # the bundled encoder wins
    bundled.write_text('REASONING_EFFORT_PROMPTS = {}\nDEFAULT_REASONING_EFFORT = "low"\n')
    assert detect_profile(tmp_path, dspark=False) is REFRESH_PROFILE
    monkeypatch.setenv(PROFILE_ENV, "preview")
    assert detect_profile(tmp_path, dspark=True) is PREVIEW_PROFILE  # the override wins over both
    monkeypatch.setenv(PROFILE_ENV, "bogus")
    with pytest.raises(ValueError, match="preview"):
        detect_profile(tmp_path, dspark=False)


def test_detection_reads_the_config_when_not_told(tmp_path, monkeypatch):
    """`dspark` omitted: the checkpoint's config.json decides (the servers' path)."""
    monkeypatch.delenv(PROFILE_ENV, raising=False)
    assert detect_profile(tmp_path) is PREVIEW_PROFILE  # no config at all
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v4", "dspark_block_size": 5}')
    assert detect_profile(tmp_path) is REFRESH_PROFILE
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v4"}')
    assert detect_profile(tmp_path) is PREVIEW_PROFILE


@pytest.mark.parametrize("profile,allowed", [("preview", "high, max, low, medium, minimal, xhigh, none"),
                                             ("refresh", "high, low, max, medium, minimal, xhigh, none")])
def test_serving_requests_refuse_unknown_efforts_in_both_modes(profile, allowed):
    """`encode_request` (what both servers call) names every accepted effort, aliases and `none`
    included, and refuses an unknown one whether or not thinking is on."""
    for kwargs in ({"thinking": True}, {"thinking": False}, None):
        with pytest.raises(ValueError, match=f"'ultra' is not defined by the '{profile}' profile.*{allowed}$"):
            encode_request(MESSAGES, chat_template_kwargs=kwargs, reasoning_effort="ultra", profile=PROFILES[profile])
    assert encode_request(MESSAGES, reasoning_effort="none", profile=PROFILES[profile]).endswith(ASSISTANT + THINK_END)


@pytest.mark.parametrize("preset,profile", [("flash", "preview"), ("flash-0731", "refresh")])
def test_vllm_deepseek_v4_tokenizer_mode_renders_the_checkpoint_profile(tmp_path, monkeypatch, preset, profile):
    """The plugin's `deepseek_v4` tokenizer mode (vLLM's choice for the architecture) renders with the
    tiny checkpoint's profile, as DeepSeek's official encoder does, and survives pickling (vLLM ships
    tokenizers to other processes)."""
    pytest.importorskip("vllm")
    import pickle

    from chat_corpus import OFFICIAL_EFFORT, official_encode
    from v4_plugin.checkpoint.tiny import make_tiny
    from vllm.tokenizers.registry import TokenizerRegistry
    from vllm_backend.plugin import register

    monkeypatch.delenv(PROFILE_ENV, raising=False)
    register()
    model_dir = make_tiny(tmp_path / preset, preset, seed=0)
    tokenizer = TokenizerRegistry.load_tokenizer("deepseek_v4", str(model_dir))
    for tok in (tokenizer, pickle.loads(pickle.dumps(tokenizer))):
        for effort in ("max", None):
            expected = official_encode(MESSAGES, thinking=True, effort=OFFICIAL_EFFORT[(profile, effort)])
            assert tok.apply_chat_template(MESSAGES, tokenize=False, reasoning_effort=effort) == expected
        assert tok.apply_chat_template(MESSAGES) == tok.encode(expected, add_special_tokens=False)
