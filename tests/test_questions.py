"""One wording of a problem's user turn for the dataset, the trainers and eval (pipeline.questions)."""

from __future__ import annotations

import datasets

from pipeline.questions import choice_letter, choices_listed, question_text
from trainer.data import eval_examples, rl_dataset

EMBEDDED = "Which city is largest?\nA. Oslo\nB. Lima\nC. Cairo"
CHOICES = ["Oslo", "Lima", "Cairo"]


def test_choices_are_lettered_unless_the_question_lists_them():
    assert choices_listed(EMBEDDED, CHOICES) and not choices_listed("Which city is largest?", CHOICES)
    assert question_text(EMBEDDED, CHOICES) == EMBEDDED
    plain = question_text("Which city is largest?", CHOICES)
    assert plain.splitlines()[-3:] == ["(A) Oslo", "(B) Lima", "(C) Cairo"]
    assert [choice_letter(i) for i in (0, 25, 26, 27)] == ["A", "Z", "AA", "AB"]


def test_trainer_prompts_do_not_repeat_choices_the_question_already_lists():
    """Where the two old copies disagreed: the trainer's appended the choices a second time to a
    question that already listed them (seed sources often embed the options)."""
    table = datasets.Dataset.from_list([{
        "id": "q1", "images": [], "problem": EMBEDDED, "answer": "C", "answer_type": "choice",
        "choices": CHOICES}])
    [row] = rl_dataset(table)
    text = row["prompt"][0]["content"][-1]["text"]
    assert text.count("Oslo") == 1 and text.count("Cairo") == 1
    assert text == question_text(EMBEDDED, CHOICES, format_hint=True)
    [example] = eval_examples(table, format_hint=True)
    assert example.prompt.count("Lima") == 1
