import threading

import pytest

from pipeline.records import Reject
from pipeline.response_format import extract_answer, split_response
from pipeline.verify import VerifyStage, answers_match, compare

CHOICES = ["30", "40°", "50", "60"]


@pytest.mark.parametrize("predicted, gold", [
    ("0.5", "1/2"), ("\\frac{1}{2}", "0.5"), ("40°", "40"), ("40", "40^{\\circ}"), ("40 degrees", "40°"),
    ("x = 5", "5"), ("\\boxed{5}", "5"), ("5 cm^2", "5"), ("5 square units", "5"), ("10 m/s", "10"),
    ("The answer is 5", "5"), ("−3", "-3"), ("3,000", "3000"), ("2√3", "2\\sqrt{3}"),
    ("12.5", "12.5%"), ("approximately 3.14", "3.14"), ("3/2 m", "1.5"),
])
def test_numbers_match_across_notations_and_units(predicted, gold):
    verdict = compare(predicted, gold, "number")
    assert verdict.correct and verdict.method == "math_verify", verdict


@pytest.mark.parametrize("predicted, gold", [("41", "40"), ("55", "5"), ("50°", "40"), ("5 and 6", "5"), ("0.25", "1/2")])
def test_wrong_numbers_do_not_match(predicted, gold):
    verdict = compare(predicted, gold, "number")
    assert verdict.parsed and not verdict.correct


def test_expressions_compare_symbolically():
    assert answers_match("1+x", "x+1", "expression")
    assert answers_match("\\frac{\\sqrt 2}{2}", "\\sqrt{2}/2", "expression")
    assert answers_match("2x+1", "y=2x+1", "expression")
    assert not answers_match("x-1", "x+1", "expression")


@pytest.mark.parametrize("predicted", ["B", "(B)", "B.", "b", "Answer: B", "Option B", "\\boxed{B}",
                                       "(B) 40°", "B) 40°", "40°", "40", "The correct answer is (B)."])
def test_choice_normalisation_to_letter(predicted):
    assert answers_match(predicted, "B", "choice", CHOICES), predicted


def test_choice_gold_given_as_option_text_and_wrong_letters():
    assert answers_match("B", "40°", "choice", CHOICES)
    assert not answers_match("A", "B", "choice", CHOICES)
    assert not answers_match("The answer is C", "B", "choice", CHOICES)
    assert compare("E", "B", "choice", CHOICES).method == "unparsable"  # only 4 options
    assert compare("A or B", "B", "choice", CHOICES).parsed is False


def test_text_answers_and_unparsable():
    assert answers_match("paris.", "Paris", "text")
    assert not answers_match("London", "Paris", "text")
    assert answers_match("12.0", "12", "text")
    assert compare("", "5", "number").parsed is False
    assert compare("no idea", "5", "number").method == "unparsable"


def test_works_outside_the_main_thread():
    out = []
    worker = threading.Thread(target=lambda: out.append(answers_match("0.5", "1/2", "number")))
    worker.start()
    worker.join()
    assert out == [True]


def test_split_response_is_strict_about_shape():
    assert split_response(" <think> a </think>\n<answer> 5 </answer>\n") == ("a", "5")
    for bad in ["<think>a</think>", "x<think>a</think><answer>5</answer>", "<think></think><answer>5</answer>",
                "<think>a</think><answer> </answer>", "<think>a<answer>4</answer></think><answer>5</answer>",
                "<think>a</think><answer>5</answer>tail"]:
        assert split_response(bad) is None, bad
    assert extract_answer("<think>a</think><answer>1</answer><answer> 2 </answer>") == "2"
    assert extract_answer("<answer> </answer>") is None


def _record(response, gold="40", answer_type="number", choices=None):
    rec = {"id": "ab" * 16, "source": "procedural/test", "gold_answer": gold, "answer_type": answer_type,
           "choices": choices}
    if response is not None:
        rec["response"] = response
    return rec


def test_verify_stage_keeps_wrong_answers_and_rejects_unreadable_ones():
    stage = VerifyStage()
    right, wrong, unreadable, missing, choice = stage.run([
        _record("<think>t</think><answer>40°</answer>"),
        _record("<think>t</think><answer>41</answer>"),
        _record("<think>t</think><answer>I cannot tell</answer>"),
        _record(None),
        _record("<think>t</think><answer>(B)</answer>", gold="B", answer_type="choice", choices=CHOICES),
    ])
    assert right["verification"] == {"correct": True, "method": "math_verify", "gold": "40", "predicted": "40°"}
    assert right["predicted_answer"] == "40°" and "updated_at" in right
    assert wrong["verification"]["correct"] is False and wrong["predicted_answer"] == "41"
    assert isinstance(unreadable, Reject) and unreadable.reason == "answer_unparsable"
    assert unreadable.field == "$.response" and "ab" * 16 in unreadable.message
    assert isinstance(missing, Reject) and missing.reason == "missing_input"
    assert choice["verification"]["method"] == "choice_letter" and choice["verification"]["correct"]


def test_power_towers_and_huge_answers_cannot_hang_a_worker_thread():
    out = []

    def work():
        out.append(compare("9^{9^{9^{9}}}", "5", "number"))
        out.append(compare("1" * 5000, "5", "number"))
        out.append(compare("e^{x^2}", "e^{x^{2}}", "expression"))

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(60)
    assert not worker.is_alive()
    tower, huge, fine = out
    assert tower.method == huge.method == "unparsable" and fine.correct


def test_choice_letters_inside_prose_and_no_false_letters():
    assert answers_match("I think the answer is B.", "B", "choice", CHOICES)
    assert compare("So the correct option is (C)", "B", "choice", CHOICES).parsed
    assert compare("I think it's B", "B", "choice", None).method == "unparsable"  # not letter "I"
    assert compare("The answer is A or B", "B", "choice", CHOICES).method == "unparsable"
