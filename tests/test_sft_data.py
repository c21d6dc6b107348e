"""Chat SFT data (abi_train/data/sft.py): formats and their auto-detection, bad rows in one line, the assistant
mask against stored goldens (and against transformers' ``{% generation %}`` masks), overlong handling,
packing and length buckets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from abi_train.data.sampler import GlobalBatchSampler
from abi_train.data.sft import (
    ChatEncoder,
    Example,
    LengthBuckets,
    PackedRows,
    collate_padded,
    detect_format,
    fit_length,
    pack,
    read_conversations,
    resolve_template,
)
from abi_train.data.tokenizer import EOS, Tokenizer
from abi_train.errors import UserError

GOLDEN = Path(__file__).parent / "golden"
# A tiny template of our own: role tags, an end token after every turn; the assistant's part is marked with
# {% generation %} so transformers can compute its own mask for comparison.
TINY_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}\n"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six, 6."},
]
ROWS = {
    "messages": {"messages": CONVERSATION[1:3]},
    "sharegpt": {"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "It is 4."}]},
    "alpaca": {"instruction": "What is 2+2?", "input": "", "output": "It is 4."},
    "prompt_completion": {"prompt": "What is 2+2?", "completion": "It is 4."},
}


def tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE trained on fixed text (deterministic) with the tiny template's special tokens."""
    text = ["What is 2+2? It is 4. And 3+3? Six, 6. Be brief. Hello world, the quick brown fox."] * 20
    tok = Tokenizer.train(text, 300, special_tokens=(EOS, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"))
    tok.chat_template = TINY_TEMPLATE
    return tok


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt", list(ROWS))
def test_each_format_parses_and_is_detected(tmp_path: Path, fmt: str) -> None:
    path = write_jsonl(tmp_path / f"{fmt}.jsonl", [ROWS[fmt], ROWS[fmt]])
    expected = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
    for chosen in ("auto", fmt):
        convs = read_conversations([path], chosen)
        assert [c.messages for c in convs] == [expected, expected]
    assert detect_format(list(ROWS[fmt]), "x") == fmt


def test_parquet_and_extra_columns_and_alpaca_input(tmp_path: Path) -> None:
    import datasets

    path = tmp_path / "a.parquet"
    datasets.Dataset.from_list([{"instruction": "Sum", "input": "2 and 2", "output": "4", "kind": "math"}]).to_parquet(
        str(path)
    )
    (conv,) = read_conversations([path], "auto")
    assert conv.messages[0] == {"role": "user", "content": "Sum\n\n2 and 2"} and conv.extra == {"kind": "math"}


def test_bad_rows_and_columns_are_one_line_naming_what_was_found(tmp_path: Path) -> None:
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError) as e:
        read_conversations([odd], "auto")
    msg = str(e.value)
    assert "odd.jsonl" in msg and "['answer', 'question']" in msg and "match no chat format" in msg
    assert "alpaca needs 'instruction' and 'output'" in msg and len(msg.splitlines()) == 1
    missing = write_jsonl(tmp_path / "m.jsonl", [ROWS["alpaca"], {"instruction": "only this"}])
    with pytest.raises(UserError) as e:
        read_conversations([missing], "auto")
    assert str(e.value).endswith(
        "m.jsonl row 1: no instruction or output; data.format=alpaca needs 'instruction' and 'output' "
        "(and optionally 'input'), the row has columns ['instruction']"
    )
    bad_role = write_jsonl(tmp_path / "r.jsonl", [{"conversations": [{"from": "bot", "value": "x"}]}])
    with pytest.raises(UserError, match=r"r.jsonl row 0: a turn without from"):
        read_conversations([bad_role], "sharegpt")
    with pytest.raises(UserError, match=r"data.format='chatml' is not valid"):
        read_conversations([bad_role], "chatml")


def test_template_choice_and_missing_template(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    assert resolve_template(None, tok, "x") == TINY_TEMPLATE
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}")
    assert resolve_template(str(tmp_path / "t.jinja"), tok, "x") == "{{ messages[0]['content'] }}"
    tok.chat_template = None
    with pytest.raises(UserError, match=r"^data=chat needs a chat template and the tokenizer of init_from=m has none"):
        resolve_template(None, tok, "init_from=m")
    with pytest.raises(UserError, match=r"neither a Jinja template nor an existing file"):
        resolve_template("nope.jinja", tok, "x")


def mask_record(tok: Tokenizer, template: str, train_on: str) -> dict:
    ids, mask = ChatEncoder(tok, template, train_on).encode(CONVERSATION)
    learned = tok.decode(ids[mask].tolist())
    return {"ids": ids.tolist(), "mask": "".join("1" if m else "0" for m in mask), "learned": learned}


def check_golden(name: str, record: dict) -> None:
    golden = json.loads((GOLDEN / name).read_text())
    assert record == golden


def test_tiny_template_mask_equals_golden_and_transformers() -> None:
    from transformers import PreTrainedTokenizerFast

    tok = tiny_tokenizer()
    record = mask_record(tok, TINY_TEMPLATE, "assistant")
    check_golden("sft_mask_tiny.json", record)
    # Both replies with their end token, nothing of the prompts, not the newline after <|end|>.
    assert record["learned"] == "It is 4.<|end|>Six, 6.<|end|>"
    # The independent reference: transformers' mask from the template's {% generation %} blocks.
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.hf)
    out = hf.apply_chat_template(
        CONVERSATION, chat_template=TINY_TEMPLATE, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert out["input_ids"] == record["ids"]
    assert "".join(map(str, out["assistant_masks"])) == record["mask"]
    last = mask_record(tok, TINY_TEMPLATE, "last")
    assert last["ids"] == record["ids"] and tok.decode(np.array(last["ids"])[np.array(list(last["mask"])) == "1"]) == (
        "Six, 6.<|end|>"
    )
    assert set(mask_record(tok, TINY_TEMPLATE, "all")["mask"]) == {"1"}


@pytest.mark.smollm2
def test_smollm2_template_mask_equals_golden() -> None:
    from abi_train.sources import PACKAGED, load_pretrained

    pytest.importorskip(PACKAGED["smollm2-135m-instruct"][0].split(".")[0], exc_type=ImportError)
    tok = load_pretrained("smollm2-135m-instruct").tokenizer
    record = mask_record(tok, tok.chat_template, "assistant")
    check_golden("sft_mask_smollm2.json", record)
    assert record["learned"] == "It is 4.<|im_end|>Six, 6.<|im_end|>"


def test_a_template_that_drops_earlier_replies_is_refused() -> None:
    # Shows only the last assistant reply: the first one is nowhere in the conversation's rendering.
    template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}|{% endif %}"
        "{% endfor %}"
    )
    with pytest.raises(UserError, match="^the chat template leaves assistant turn 1 out of the conversation"):
        ChatEncoder(tiny_tokenizer(), template).encode(CONVERSATION)


def ex(n: int, learned: slice | None = None) -> Example:
    mask = np.zeros(n, dtype=bool)
    mask[learned or slice(n // 2, n)] = True
    return Example(np.arange(n, dtype=np.int64) + 5, mask)


def test_overlong_truncate_skip_and_all_too_long() -> None:
    examples = [ex(10), ex(40), ex(30, slice(25, 30))]
    kept, truncated, skipped = fit_length(examples, 20, "truncate", "training")
    # 40 is cut to 21 tokens (20 inputs); 30's labels all lie past the cut, so it is skipped.
    assert [e.inputs for e in kept] == [9, 20] and (truncated, skipped) == (1, 1)
    kept, truncated, skipped = fit_length(examples, 20, "skip", "training")
    assert [e.inputs for e in kept] == [9] and (truncated, skipped) == (0, 2)
    with pytest.raises(
        UserError, match=r"^every training conversation \(2\) is longer than data.seq_len=8 .*longest: 39"
    ):
        fit_length([ex(10), ex(40)], 8, "skip", "training")
    with pytest.raises(UserError, match="data.overlong='cut' is not valid"):
        fit_length(examples, 20, "cut", "training")


def test_packing_rows_positions_segments_and_targets() -> None:
    examples = [ex(9), ex(5), ex(7), ex(3)]  # inputs 8, 4, 6, 2
    assert pack([e.inputs for e in examples], 10) == [[0, 3], [2, 1]]
    rows = PackedRows(examples, 10, pad_id=0)
    row = rows[0]
    assert row["positions"].tolist() == [*range(8), 0, 1]
    assert row["segments"].tolist() == [0] * 8 + [1] * 2 and int(row["tokens"]) == 10
    assert row["idx"][:8].tolist() == examples[0].ids[:-1].tolist()
    assert row["targets"][:8].tolist() == [-100] * 3 + examples[0].ids[4:].tolist()
    row = rows[1]  # 6 + 4 tokens fill it exactly
    assert row["segments"].tolist() == [0] * 6 + [1] * 4
    short = PackedRows([ex(5)], 10, pad_id=0)[0]  # padding: its own segment, no targets
    assert short["segments"].tolist() == [0] * 4 + [1] * 6 and short["targets"][4:].eq(-100).all()
    batch = collate_padded([(e.ids[:-1], e.mask[1:]) for e in examples[:2]], pad_id=0)
    assert batch["idx"].shape == (2, 8) and batch["tokens"] == 12


def test_length_buckets_group_by_length_and_resume_the_same() -> None:
    lengths = list(np.random.default_rng(0).integers(1, 100, 64))
    sampler = GlobalBatchSampler(64, 4, seed=3)
    buckets = LengthBuckets(sampler, lengths, window=4)
    it = iter(buckets)
    first = [next(it) for _ in range(8)]
    # Every index of the window's steps, once; each micro-batch spans a narrow range of lengths.
    for w in range(2):
        window = [i for b in first[4 * w : 4 * w + 4] for i in b]
        assert sorted(window) == sorted(i for s in range(4 * w, 4 * w + 4) for i in sampler.indices(s, 0))
    spread = np.mean([np.ptp([lengths[i] for i in b]) for b in first])
    assert spread < np.mean([np.ptp([lengths[i] for i in sampler.indices(s, 0)]) for s in range(8)]) / 2
    resumed = iter(LengthBuckets(GlobalBatchSampler(64, 4, seed=3, start_step=5), lengths, window=4))
    assert [next(resumed) for _ in range(3)] == first[5:]
