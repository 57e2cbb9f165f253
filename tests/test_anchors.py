from pipeline.synthesis.anchors import find_anchors, think_text

SCENE = {"family": "geometry", "elements": [
    {"id": "B", "label": "angle B", "kind": "angle", "bbox": [0, 0, 1, 1]},
    {"id": "AC", "label": "side AC", "kind": "segment", "bbox": [0, 0, 1, 1]},
]}


def test_counts_one_anchor_per_cue_sentence_and_links_elements():
    resp = ("<think>We need x. Look back at the figure: angle B is marked 40 degrees. "
            "Then x = 180 - 40 - 90 = 50. Check the image again: side AC is the hypotenuse.\n"
            "So x = 50.</think><answer>50</answer>")
    anchors = find_anchors(resp, SCENE)
    assert [a["element"] for a in anchors] == ["B", "AC"]
    assert [a["cue"] for a in anchors] == ["look back at", "check the image"]
    for a in anchors:
        assert resp[a["start"]:a["end"]] == a["text"]


def test_no_think_no_anchors_and_answer_text_ignored():
    assert find_anchors("<answer>look back at the image</answer>") == []
    assert think_text("no tags") == ("", 0)
    resp = "<think>Compute 2+2=4.</think><answer>In the image: 4</answer>"
    assert find_anchors(resp) == []


def test_cue_must_be_whole_words():
    assert find_anchors("<think>The outlook back at home is fine.</think><answer>1</answer>") == []
