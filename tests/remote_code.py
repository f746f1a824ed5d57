"""Load a saved folder through trust_remote_code in a fresh process where this package cannot be imported."""

import subprocess
import sys
import textwrap

import torch

HIDE_PACKAGE = """
import sys, importlib.abc
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("modeling_llama_avsr", "trainer"):
            raise ImportError("hidden for this test: " + name)
sys.meta_path.insert(0, Hide())
sys.path = [p for p in sys.path if p not in ("", ".")]
"""


def remote_logits_match(folder, inputs, expected_logits, extra_check: str = "") -> subprocess.CompletedProcess:
    """Runs AutoModelForCausalLM/AutoProcessor.from_pretrained(folder, trust_remote_code=True) in a new interpreter,
    asserts the model gives `expected_logits` on `inputs`, then runs `extra_check` (with `model`, `processor` bound).
    Prints REMOTE_OK on success."""
    torch.save(dict(inputs), folder / "inputs.pt")
    torch.save(expected_logits, folder / "expected.pt")
    script = HIDE_PACKAGE + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoProcessor
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        inputs = torch.load({str(folder / "inputs.pt")!r})
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, torch.load({str(folder / "expected.pt")!r}))
        """
    ) + textwrap.dedent(extra_check) + "\nprint('REMOTE_OK')\n"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=folder)
