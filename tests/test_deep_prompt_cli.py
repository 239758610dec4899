"""One base-to-novel run per deep-prompt method through the command line, on digits with toy-clip."""

from __future__ import annotations

import json
import math

import pytest

from tests.tcp_family_support import DIGIT_NAMES, run_base2novel_cli, shared_digits_root, toy_backbone

EXPECTED_TERMS = {
    "ivlp": {"ce"},
    "maple": {"ce"},
    "promptsrc": {"ce", "scl_text", "scl_image", "scl_logits"},
    "coprompt": {"ce", "text_consistency", "image_consistency"},
}


def toy_parameter_counts() -> dict[str, int]:
    backbone = toy_backbone()
    text, vision, embed = backbone.text_width, backbone.vision_width, backbone.embed_dim
    ivlp = 9 * 4 * text + 9 * 4 * vision
    maple = 9 * 2 * text + 9 * (text * vision + vision)
    return {"ivlp": ivlp, "promptsrc": ivlp, "maple": maple, "coprompt": maple + 4 * embed * (embed // 4)}


@pytest.mark.slow
@pytest.mark.parametrize("method", ("ivlp", "maple", "promptsrc", "coprompt"))
def test_base2novel_cli_run(method, tmp_path, tmp_path_factory):
    extra: list[str] = []
    if method == "coprompt":
        descriptions = {name: [f"a handwritten {name}.", f"the digit {name} written by hand."] for name in DIGIT_NAMES}
        (tmp_path / "digits.json").write_text(json.dumps(descriptions))
        extra = ["--set", f"descriptions_file={tmp_path / '{dataset}.json'}"]
    results = run_base2novel_cli(method, shared_digits_root(tmp_path_factory), tmp_path, *extra)

    assert results["complete"] is True
    assert results["method"] == method
    assert results["num_base_classes"] == 5
    assert results["num_novel_classes"] == 5
    assert 0.0 <= results["base_accuracy"] <= 100.0
    assert 0.0 <= results["novel_accuracy"] <= 100.0
    assert results["trainable_params"] == toy_parameter_counts()[method]
    assert len(results["epochs"]) == 1
    terms = set(results["loss_terms"]) - {"epoch", "lr", "loss"}
    assert terms == EXPECTED_TERMS[method]
    assert all(math.isfinite(results["loss_terms"][name]) for name in terms)
    run = tmp_path / "runs" / "base2novel" / "digits" / method / "seed1"
    assert (run / "model.pt").is_file()
    assert not (run / "gpa_state.pt").exists()
    if method == "promptsrc":
        assert results["config"]["method"]["gpa_mean"] == 15.0
    if method == "coprompt":
        assert results["config"]["method"]["descriptions_file"].endswith("{dataset}.json")
