"""A plain transformers ``Trainer`` fine-tuning script with a LoRA adapter, as users write them.

It knows nothing of trainwarden except, optionally, ``WardenCallback`` and the
checkpoint to resume from in ``TRAINWARDEN_RESUME_FROM``: the README's recipe
for "Supervise your own training script". The tests run it as is, under the
supervisor and without it.

    python examples/plain_trainer.py --model PATH --data FILE.jsonl --output_dir OUT \\
        [--max_steps 60] [--save_steps 10] [--warden-callback]
"""

from __future__ import annotations

import argparse
import os

import datasets
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
    set_seed,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="a .jsonl file with a 'text' column")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=60)
    parser.add_argument("--save_steps", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--warden-callback", action="store_true", help="add WardenCallback")
    options = parser.parse_args()
    set_seed(0)  # before get_peft_model: the LoRA weights start from torch's RNG

    tokenizer = AutoTokenizer.from_pretrained(options.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(options.model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM"))

    raw = datasets.load_dataset("json", data_files=options.data, split="train")
    train = raw.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=64),
        batched=True,
        remove_columns=raw.column_names,
    )
    args = TrainingArguments(
        output_dir=options.output_dir,
        max_steps=options.max_steps,
        save_steps=options.save_steps,
        per_device_train_batch_size=options.batch_size,
        learning_rate=5e-3,
        logging_steps=10,
        seed=0,
        report_to="none",
        use_cpu=True,
    )
    callbacks = []
    if options.warden_callback:
        from trainer_child.callback import WardenCallback  # noqa: PLC0415 - only when asked

        callbacks.append(WardenCallback())
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=os.environ.get("TRAINWARDEN_RESUME_FROM") or None)
    trainer.save_model(options.output_dir)


if __name__ == "__main__":
    main()
