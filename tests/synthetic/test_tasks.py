"""Generators are deterministic per seed; checkers accept references and reject perturbations.

The references here are written independently of the checkers: plain Python arithmetic
on the numbers the test draws itself."""

import random

import pytest

from anchored_megatron.data.synthetic import (
    GENERAL_SKILLS, RegimeData, TargetTask, eval_prompts, finetune_records, pretrain_records, replay_records, styles,
)


@pytest.mark.parametrize("regime", ["A", "B", "C"])
def test_pretraining_data_is_deterministic_per_seed(regime):
    data = RegimeData(regime=regime, pretrain_per_skill=30)
    assert pretrain_records(data, 7) == pretrain_records(data, 7)
    assert pretrain_records(data, 7) != pretrain_records(data, 8)


def test_finetune_and_eval_sets_are_deterministic_and_held_out():
    data = RegimeData(finetune_examples=50, eval_per_skill=40, pretrain_per_skill=50)
    assert finetune_records(data, 1) == finetune_records(data, 1)
    train = {r["prompt"] for r in pretrain_records(data, 1)} | {r["prompt"] for r in finetune_records(data, 1)}
    held_out = eval_prompts(data, 1, exclude=train)
    assert held_out == eval_prompts(data, 1, exclude=train)
    assert set(held_out) == set(data.skills) | {"target"}
    for task, prompts in held_out.items():
        assert len(prompts) == 40
        assert not set(prompts) & train, task


def test_replay_records_are_general_skills_off_the_held_out_prompts():
    data = RegimeData(eval_per_skill=40, pretrain_per_skill=50)
    held_out = {p for prompts in eval_prompts(data, 1).values() for p in prompts}
    records = replay_records(data, 1, 60, exclude=held_out)
    assert records == replay_records(data, 1, 60, exclude=held_out) and len(records) == 60
    assert not {r["prompt"] for r in records} & held_out
    # Every skill in turn, each response one of the base's dressings of the skill's own answer.
    for i, record in enumerate(records):
        name = data.skills[i % len(data.skills)]
        assert record["prompt"].startswith(name + " ")
        content = styles.parse(record["response"])
        assert content is not None and GENERAL_SKILLS[name].check(record["prompt"], content), record


def test_addition_checker_against_plain_arithmetic():
    rng = random.Random(0)
    skill = GENERAL_SKILLS["add"]
    for _ in range(200):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        prompt = f"add {a}+{b}"
        assert skill.check(prompt, str(a + b))
        assert not skill.check(prompt, str(a + b + 1))
        assert not skill.check(prompt, str(a + b) + "0")
        assert not skill.check(prompt, None)


@pytest.mark.parametrize("name,prompt,answer,wrong", [
    ("rev", "rev kapol", "lopak", "lopka"),
    ("up", "up kapol", "KAPOL", "KAPOl"),
    ("rep", "rep 3 kap", "kap kap kap", "kap kap"),
    ("kv", "kv a7 c2 f5 ?c", "2", "7"),
])
def test_skill_checkers_accept_reference_and_reject_perturbed(name, prompt, answer, wrong):
    skill = GENERAL_SKILLS[name]
    assert skill.check(prompt, answer)
    assert not skill.check(prompt, wrong)
    assert not skill.check(prompt, answer + " ")


def test_generated_examples_pass_their_checkers_and_one_character_edits_fail():
    rng = random.Random(3)
    for name, skill in GENERAL_SKILLS.items():
        for _ in range(100):
            prompt, content = skill.make(rng)
            assert skill.check(prompt, content), (name, prompt, content)
            i = rng.randrange(len(content))
            edited = content[:i] + ("x" if content[i] != "x" else "y") + content[i + 1:]
            assert not skill.check(prompt, edited), (name, prompt, edited)


def _solve(prompt):
    """An independent solver: evaluate the definitions with Python's eval, mod 10."""
    env = {}
    *defs, question = prompt[:-1].split(",")
    steps = []
    for d in defs:
        name, expr = d.split("=")
        value = eval(expr, {}, dict(env)) % 10  # noqa: S307 - test-only, generated input
        if env:
            left, op, right = expr[0], expr[1], expr[2]
            lv = env[left] if left.isalpha() else int(left)
            rv = env[right] if right.isalpha() else int(right)
            steps.append(f"{name}={lv}{op}{rv}={value}")
        env[name] = value
    return ",".join(steps) + f"#{env[question]}", env[question]


def test_target_solutions_match_an_independent_solver():
    task = TargetTask(2, 4)
    rng = random.Random(5)
    for _ in range(300):
        prompt = task.make_prompt(rng)
        reference, answer = _solve(prompt)
        assert task.solution(prompt) == reference
        assert task.check_exact(prompt, reference)
        assert task.check_answer(prompt, reference)
        assert task.check_answer(prompt, str(answer))
        wrong = (answer + 1) % 10
        assert not task.check_exact(prompt, reference[:-1] + str(wrong))
        assert not task.check_answer(prompt, reference[:-1] + str(wrong))
        assert not task.check_answer(prompt, str(wrong))
        assert not task.check_exact(prompt, reference.replace(",", ";"))  # another format: not exact
        assert task.check_answer(prompt, reference.replace(",", ";"))  # ... but the answer is right


def test_target_prompts_form_a_dependency_graph_on_earlier_quantities():
    task = TargetTask(2, 3)
    rng = random.Random(9)
    for _ in range(200):
        prompt = task.make_prompt(rng)
        *defs, question = prompt[:-1].split(",")
        defined = [defs[0].split("=")[0]]
        for d in defs[1:]:
            name, expr = d.split("=")
            assert all(c in defined for c in expr if c.isalpha()), prompt
            assert name not in defined
            defined.append(name)
        assert question == defined[-1]


def test_style_parse_accepts_every_dressing_and_rejects_others():
    for fillers in ((), ("ok, ",), ("so, ", "hmm, ")):
        for prefix in styles.PREFIXES:
            for ending in styles.ENDINGS:
                response = "".join(fillers) + prefix + "x=1+2=3#3" + ending
                assert styles.parse(response) == "x=1+2=3#3", response
    assert styles.parse("ok, ok, ok, 12") != "12"  # three fillers are not a valid dressing
    assert GENERAL_SKILLS["add"].check("add 10+11", styles.parse("well, it is 21 !"))
    assert not GENERAL_SKILLS["add"].check("add 10+11", styles.parse("it is 21 ?"))


def test_high_entropy_regime_has_many_responses_per_prompt_and_finetuning_has_one():
    rng = random.Random(0)
    dressed = {styles.HIGH_ENTROPY.dress("42", rng) for _ in range(500)}
    assert len(dressed) > 50
    ft = finetune_records(RegimeData(finetune_examples=100), 0)
    task = TargetTask()
    assert all(r["response"] == task.solution(r["prompt"]) for r in ft)


def test_regime_b_never_shows_the_target_and_regime_a_shows_the_concise_format():
    b = pretrain_records(RegimeData(regime="B", pretrain_per_skill=40), 0)
    assert not any(r["prompt"].endswith("?") for r in b)
    a = pretrain_records(RegimeData(regime="A", pretrain_per_skill=100), 0)
    target = [r for r in a if r["prompt"].endswith("?")]
    assert target and any(len(r["response"]) == 1 for r in target)
