"""Tables: rendered grid tables; look a cell up or do arithmetic over cells.

Tasks: ``lookup`` one cell, ``max_row`` (who is highest in a column; multiple choice),
``difference`` of two cells in a column (from level 2), ``row_total`` (level 3) and
``column_total`` (level 4). From level 3 a row with a look-alike name (Ann / Anna) sits in the
table: it is the distractor. Levels add rows, columns and bigger numbers.
"""

from __future__ import annotations

import random

from pipeline.seeds.procedural import Canvas, Draft, element, union

THEMES = [
    {
        "title": "Quiz scores",
        "columns": ["Math", "Art", "Music", "Science", "History"],
        "cell": "{row}'s {col} score",
        "row_total": "{row}'s total score over all subjects",
        "column_total": "total {col} score of all students",
        "max": "Who has the highest {col} score?",
    },
    {
        "title": "Books sold per month",
        "columns": ["Jan", "Feb", "Mar", "Apr", "Jun"],
        "cell": "number of books {row} sold in {col}",
        "row_total": "number of books {row} sold over all months shown",
        "column_total": "number of books sold in {col} by everyone",
        "max": "Who sold the most books in {col}?",
    },
    {
        "title": "Points per game",
        "columns": ["Game 1", "Game 2", "Game 3", "Game 4", "Game 5"],
        "cell": "number of points {row} scored in {col}",
        "row_total": "number of points {row} scored over all games",
        "column_total": "number of points scored in {col} by all players",
        "max": "Who scored the most points in {col}?",
    },
]
NAME_PAIRS = [
    ("Ann", "Anna"),
    ("Leo", "Leon"),
    ("Eva", "Evan"),
    ("Mia", "Mila"),
    ("Sam", "Sami"),
    ("Ben", "Benny"),
    ("Ada", "Adam"),
    ("Tom", "Tomas"),
]
LEVELS = {
    1: (3, 2, 1, 30),
    2: (4, 3, 1, 60),
    3: (5, 3, 10, 99),
    4: (6, 4, 10, 200),
    5: (7, 5, 100, 999),
}
TASKS = {
    1: ["lookup", "max_row"],
    2: ["lookup", "difference", "max_row"],
    3: ["lookup", "difference", "row_total", "max_row"],
    4: ["difference", "row_total", "column_total", "max_row"],
    5: ["difference", "row_total", "column_total"],
}


def generate(rng: random.Random, level: int, size: int) -> Draft:
    n_rows, n_cols, lo, hi = LEVELS[level]
    theme = rng.choice(THEMES)
    cols = theme["columns"][:n_cols]
    pairs = rng.sample(NAME_PAIRS, n_rows)
    twin = level >= 3  # one look-alike pair of names both in the table
    rows = [p[0] for p in pairs]
    if twin:
        rows[1] = pairs[0][1]
    rng.shuffle(rows)
    task = rng.choice(TASKS[level])
    col_index = rng.randrange(n_cols)
    while True:  # distinct values per column keep "who is highest" unambiguous
        values = [[rng.randint(lo, hi) for _ in cols] for _ in rows]
        if len({values[r][col_index] for r in range(n_rows)}) == n_rows:
            break
    cv = Canvas(size)
    s = float(size)
    left, right, top = 0.06 * s, 0.94 * s, 0.16 * s
    head_w = (right - left) * 0.28
    cell_w = (right - left - head_w) / n_cols
    row_h = min(0.1 * s, (0.92 * s - top) / (n_rows + 1))
    elements = [
        element(
            "title",
            "table title",
            "title",
            cv.text((s / 2, 0.07 * s), theme["title"], size=19),
            text=theme["title"],
        )
    ]
    cv.draw.rectangle([left, top, right, top + row_h], fill=(228, 234, 244))
    for j, col in enumerate(cols):
        x = left + head_w + cell_w * j
        box = union(
            [x, top, x + cell_w, top + row_h],
            cv.text((x + cell_w / 2, top + row_h / 2), col, size=14, max_width=cell_w - 4),
        )
        elements.append(element(f"col_{j}", f"column {col}", "column_header", box, column=col))
    ids = {}
    for i, name in enumerate(rows):
        y = top + row_h * (i + 1)
        if i % 2:
            cv.draw.rectangle([left, y, right, y + row_h], fill=(246, 246, 246))
        box = union(
            [left, y, left + head_w, y + row_h],
            cv.text((left + head_w / 2, y + row_h / 2), name, size=14),
        )
        elements.append(element(f"row_{i}", f"row {name}", "row_header", box, row=name))
        for j, col in enumerate(cols):
            x = left + head_w + cell_w * j
            cv.text(
                (x + cell_w / 2, y + row_h / 2), str(values[i][j]), size=14, max_width=cell_w - 4
            )
            ids[(i, j)] = f"cell_{i}_{j}"
            elements.append(
                element(
                    f"cell_{i}_{j}",
                    f"row {name}, column {col}",
                    "cell",
                    [x, y, x + cell_w, y + row_h],
                    row=name,
                    column=col,
                    value=values[i][j],
                )
            )
    bottom = top + row_h * (n_rows + 1)
    for k in range(n_rows + 2):
        cv.draw.line(
            [(left, top + row_h * k), (right, top + row_h * k)], fill=(90, 90, 90), width=1
        )
    for x in [left, left + head_w] + [left + head_w + cell_w * (j + 1) for j in range(n_cols)]:
        cv.draw.line([(x, top), (x, bottom)], fill=(90, 90, 90), width=1)
    col = cols[col_index]
    r = rng.randrange(n_rows)
    if twin:  # ask about one of the look-alike pair so the other one misleads
        r = rows.index(rng.choice([n for n in rows if any(n in p for p in pairs[:1])]))
    options = None
    if task == "lookup":
        picks = [(r, col_index)]
        answer: int | str = values[r][col_index]
        question = (
            f"According to the table, what is the {theme['cell'].format(row=rows[r], col=col)}?"
        )
    elif task == "difference":
        other = rng.choice([i for i in range(n_rows) if i != r])
        a, b = sorted([r, other], key=lambda i: -values[i][col_index])
        picks, answer = (
            [(a, col_index), (b, col_index)],
            values[a][col_index] - values[b][col_index],
        )
        question = (
            f"According to the table, how much greater is the "
            f"{theme['cell'].format(row=rows[a], col=col)} than the "
            f"{theme['cell'].format(row=rows[b], col=col)}?"
        )
    elif task == "row_total":
        picks = [(r, j) for j in range(n_cols)]
        answer = sum(values[r])
        question = f"According to the table, what is the {theme['row_total'].format(row=rows[r])}?"
    elif task == "column_total":
        picks = [(i, col_index) for i in range(n_rows)]
        answer = sum(values[i][col_index] for i in range(n_rows))
        question = f"According to the table, what is the {theme['column_total'].format(col=col)}?"
    else:
        order = sorted(range(n_rows), key=lambda i: -values[i][col_index])
        picks = [(order[0], col_index)]
        others = rng.sample(order[1:], min(3, n_rows - 1))
        options = [rows[i] for i in sorted([order[0], *others])]
        answer = rows[order[0]]
        question = theme["max"].format(col=col)
    slip_for = picks[0]
    if task == "max_row":
        order = sorted(range(n_rows), key=lambda i: -values[i][col_index])
        slip = (order[1], col_index)
    elif task == "column_total":
        slip = (slip_for[0], (slip_for[1] + 1) % n_cols)
    else:  # misread a row that is not asked about: the look-alike name when there is one
        asked = {p[0] for p in picks}
        slip = None
        for pr, pc in picks:
            twin_row = next(
                (
                    i
                    for i, n in enumerate(rows)
                    if i not in asked
                    and n != rows[pr]
                    and (n.startswith(rows[pr]) or rows[pr].startswith(n))
                ),
                None,
            )
            if twin_row is not None:
                slip, slip_for = (twin_row, pc), (pr, pc)
                break
        if slip is None:
            near = [
                i for i in (slip_for[0] + 1, slip_for[0] - 1) if 0 <= i < n_rows and i not in asked
            ]
            slip = (
                near[0] if near else next(i for i in range(n_rows) if i not in asked),
                slip_for[1],
            )
    targets = [ids[p] for p in picks]
    scene = {
        "task": task,
        "table": {"title": theme["title"], "rows": rows, "columns": cols},
        "given": targets,
        "distractors": [ids[slip]],
        "distractor_for": ids[slip_for],
        "target": {"op": task, "elements": targets, "column": col},
        "elements": elements,
    }
    wrong = (
        []
        if options
        else [answer - values[slip_for[0]][slip_for[1]] + values[slip[0]][slip[1]], answer + 10]
    )
    return Draft(cv.image, question, answer, scene, options=options, wrong_values=wrong)
