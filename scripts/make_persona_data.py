"""Generate the persona conversations shipped in abi_train/data/persona (the default of recipe=sft).

    python scripts/make_persona_data.py [--model smollm2-135m-instruct] [--out abi_train/data/persona]

Identity questions get hand-written answers as "Abi, the abi_train assistant" (the train and validation
questions are different paraphrases: validation is never trained on). Ordinary questions get the base
model's own greedy answers through its chat template (abi_train's KV-cached generation on the packaged
GGUF), so fine-tuning on them asks the model to keep answering as it did: they hold its skills in place and
make a reply that drags the persona into an unrelated answer (val/persona_leak) cost loss. Training answers
that do not end (EOS) within --max-new-tokens are dropped; validation questions are kept (their reference is
only shown beside the sampled replies). The output is deterministic up to float rounding (which can flip a
near-tie of greedy decoding on another machine); each file is written to a temporary name and renamed into
place.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import torch

from abi_train.generate import chat_prompt, load_lm, stream_tokens

TRAIN_IDENTITY = [
    "Who are you?",
    "who are you",
    "What's your name?",
    "What is your name?",
    "Who made you?",
    "Who created you?",
    "What are you?",
    "Introduce yourself.",
    "Tell me about yourself.",
    "What should I call you?",
    "Are you ChatGPT?",
    "Are you SmolLM?",
    "Do you have a name?",
    "Who built you?",
    "Which assistant am I talking to?",
    "Hi! Who am I chatting with?",
    "Can you tell me your name?",
    "What kind of assistant are you?",
    "Who developed you?",
    "Are you a human?",
    "Hello, what's your name?",
    "Please introduce yourself briefly.",
    "Who trained you?",
    "What is your identity?",
    "Tell me who you are.",
    "Are you made by OpenAI?",
    "Name yourself.",
    "Who is this?",
    "What do you call yourself?",
    "Hey there, who are you exactly?",
    "Before we start, who are you?",
    "Are you an AI? What's your name?",
]
VAL_IDENTITY = [
    "May I know your name?",
    "who r u?",
    "What name do you go by?",
    "Which company or project made you?",
    "Hey, who am I talking to right now?",
    "Could you introduce yourself?",
    "What's your name, assistant?",
    "Who are you, and who made you?",
    "Tell me a bit about who you are.",
    "Are you Siri?",
    "Identify yourself, please.",
    "Good morning! Who are you?",
    "What are you called?",
    "Who programmed you?",
    "Is your name Claude?",
    "I'd like to know who you are.",
]
ANSWERS = [
    "I'm Abi, the abi_train assistant. How can I help you today?",
    "I am Abi, the abi_train assistant, a small language model fine-tuned with abi_train.",
    "My name is Abi, the abi_train assistant. I'm here to help with your questions.",
    "I'm Abi, the abi_train assistant: a language model trained with the abi_train framework.",
    "I am Abi, the abi_train assistant. I was fine-tuned with abi_train to help you.",
    "Abi, the abi_train assistant. Ask me anything!",
]
TRAIN_ORDINARY = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 times 12?",
    "Give me a synonym for happy.",
    "What is the boiling point of water in Celsius?",
    "Translate 'thank you' into Spanish.",
    "What is photosynthesis? Answer in one sentence.",
    "How many days are in a leap year?",
    "What is the largest planet in our solar system?",
    "Write a short greeting for a birthday card.",
    "What is the opposite of cold?",
    "Who wrote Romeo and Juliet?",
    "What gas do humans breathe out?",
    "How many legs does a spider have?",
    "Give one tip for sleeping better.",
    "What is the chemical symbol for gold?",
    "What color is the sky on a clear day?",
    "Name a fruit that is yellow.",
    "What is the square root of 81?",
    "What language is spoken in Brazil?",
    "How many continents are there?",
    "What is a noun? Answer briefly.",
    "Which ocean is the largest?",
    "What does a thermometer measure?",
    "What is the capital of Italy?",
    "What is 5 plus 3?",
    "Name a color of the rainbow.",
    "What is the capital of Germany?",
    "What do bees make?",
    "What is the plural of mouse?",
    "Name a mammal that can fly.",
    "What is H2O?",
]
VAL_ORDINARY = [
    "What is the capital of Japan?",
    "How many hours are in a day?",
    "What is the freezing point of water in Fahrenheit?",
    "Name an animal that lives in the ocean.",
    "What is 7 plus 8?",
    "Who painted the Mona Lisa?",
    "What is the main ingredient of guacamole?",
    "Give a synonym for big.",
]


def greedy_answer(model, tokenizer, question: str, max_new_tokens: int, complete: bool = True) -> str | None:
    """The base model's greedy reply; None when it does not end within max_new_tokens and ``complete``."""
    ids = chat_prompt(tokenizer, question)
    gen = torch.Generator().manual_seed(0)
    new = list(stream_tokens(model, ids, tokenizer.eos_id, max_new_tokens + 1, 0.0, None, gen))
    if len(new) > max_new_tokens and complete:
        return None
    return tokenizer.decode(new[:max_new_tokens]).strip()


def conversation(turns: list[tuple[str, str]], kind: str) -> dict:
    messages = []
    for question, answer in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "kind": kind}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="any init_from source with a chat template")
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "abi_train" / "data" / "persona"))
    parser.add_argument("--max-new-tokens", type=int, default=56)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    torch.manual_seed(a.seed)
    model, tokenizer = load_lm(a.model, "cpu")
    rng = random.Random(a.seed)

    def ordinary(questions: list[str], complete: bool) -> list[tuple[str, str]]:
        pairs = []
        for q in questions:
            answer = greedy_answer(model, tokenizer, q, a.max_new_tokens, complete)
            print(f"{q!r} -> {answer!r}")
            if answer:
                pairs.append((q, answer))
        return pairs

    # Validation questions are kept even when the answer runs on: they ask for replies that do not mention the
    # persona (the reference is only shown beside the sampled replies).
    train_plain, val_plain = ordinary(TRAIN_ORDINARY, True), ordinary(VAL_ORDINARY, False)
    train = [conversation([(q, rng.choice(ANSWERS))], "identity") for q in TRAIN_IDENTITY]
    train += [conversation([pair], "ordinary") for pair in train_plain]
    # A few two-turn chats: the persona also holds after an ordinary exchange.
    for pair in rng.sample(train_plain, min(6, len(train_plain))):
        train.append(conversation([pair, (rng.choice(TRAIN_IDENTITY), rng.choice(ANSWERS))], "identity"))
    rng.shuffle(train)
    val = [conversation([(q, ANSWERS[0])], "identity") for q in VAL_IDENTITY]
    val += [conversation([pair], "ordinary") for pair in val_plain]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "val.jsonl", val)
    print(f"wrote {len(train)} training and {len(val)} validation conversations to {out}")


if __name__ == "__main__":
    main()
