"""Recipes: validation errors say what is wrong, where, and what was probably meant."""

from __future__ import annotations

import pytest

from align import AlignError
from align.recipe import load_recipe

BASIC = """
model: fake-model
stages:
  first:
    plugin: count
    value: 2
  second:
    plugin: count
    policy: first
"""


def error_of(path, pm, overrides=()) -> str:
    with pytest.raises(AlignError) as info:
        load_recipe(path, list(overrides), pm)
    return str(info.value)


def test_a_valid_recipe_resolves_defaults_and_inputs(write_recipe, fake_pm):
    recipe = load_recipe(write_recipe(BASIC), [], fake_pm)
    assert list(recipe.stages) == ["first", "second"]
    assert recipe.stages["first"].inputs == {"policy": "base"}
    assert recipe.stages["second"].inputs == {"policy": "first"}
    assert recipe.stages["first"].config.value == 2.0
    assert recipe.stages["second"].config.value == 1.0  # the schema's default
    assert recipe.to_plain()["stages"]["second"] == {
        "plugin": "count",
        "policy": "first",
        "data": None,
        "value": 1.0,
        "fail": None,
        "learning_rate": 1e-3,
        "mode": "plain",
        "sleep": 0.0,
    }


def test_unknown_top_level_key_suggests_the_nearest(write_recipe, fake_pm):
    message = error_of(write_recipe(BASIC + "stagse: {}\n"), fake_pm)
    assert "unknown key 'stagse'" in message and "did you mean 'stages'" in message


def test_unknown_stage_key_suggests_the_nearest(write_recipe, fake_pm):
    message = error_of(write_recipe(BASIC.replace("value: 2", "valeu: 2")), fake_pm)
    assert "unknown key 'stages.first.valeu'" in message and "did you mean 'value'" in message


def test_wrong_type_names_the_key_path_and_the_expected_type(write_recipe, fake_pm):
    message = error_of(write_recipe(BASIC.replace("value: 2", "value: [1, 2]")), fake_pm)
    assert message == "'stages.first.value' must be float; got a list"


def test_numbers_written_without_a_dot_are_read_as_floats(write_recipe, fake_pm):
    # YAML 1.1 reads 1e-4 as a string; a user means a number.
    recipe = load_recipe(write_recipe(BASIC.replace("value: 2", "learning_rate: 1e-4")), [], fake_pm)
    assert recipe.stages["first"].config.learning_rate == pytest.approx(1e-4)


def test_a_bool_is_not_accepted_as_a_number(write_recipe, fake_pm):
    message = error_of(write_recipe(BASIC.replace("value: 2", "value: true")), fake_pm)
    assert "'stages.first.value' must be float" in message


def test_literal_choices_are_listed(write_recipe, fake_pm):
    message = error_of(write_recipe(BASIC + "backend: {precision: bf61}\n"), fake_pm)
    assert "'backend.precision' must be one of 'fp32', 'bf16', 'fp16'" in message


def test_reference_to_an_unknown_stage_is_an_error_with_a_suggestion(write_recipe, fake_pm):
    message = error_of(write_recipe(BASIC.replace("policy: first", "policy: frist")), fake_pm)
    assert "'stages.second.policy': 'frist' is not a stage of this recipe (did you mean 'first'?)" in message


def test_reference_to_a_later_stage_says_to_reorder(write_recipe, fake_pm):
    text = BASIC.replace("    value: 2", "    value: 2\n    policy: second").replace("    policy: first\n", "")
    message = error_of(write_recipe(text), fake_pm)
    assert "runs after it" in message and "move 'second' above 'first'" in message


def test_a_cycle_is_an_error_that_shows_it(write_recipe, fake_pm):
    text = BASIC.replace("    value: 2", "    value: 2\n    policy: second")
    message = error_of(write_recipe(text), fake_pm)
    assert "cycle: first → second → first" in message


def test_a_stage_cannot_consume_itself(write_recipe, fake_pm):
    message = error_of(write_recipe(BASIC.replace("policy: first", "policy: second")), fake_pm)
    assert "cannot take its own output" in message


def test_a_required_input_without_default_must_be_given(write_recipe, fake_pm):
    text = "model: fake-model\nstages:\n  p:\n    plugin: pair\n"
    message = error_of(write_recipe(text), fake_pm)
    assert "'stages.p.reward_model' is required: second model" in message


def test_unknown_stage_plugin_lists_the_known_ones(write_recipe, fake_pm):
    message = error_of(write_recipe(BASIC.replace("plugin: count\n    value", "plugin: cuont\n    value")), fake_pm)
    assert "stage plugin 'cuont'" in message and "did you mean 'count'" in message and "known stage plugins" in message


def test_overrides_are_typed_and_reach_nested_keys(write_recipe, fake_pm):
    recipe = load_recipe(write_recipe(BASIC), ["stages.second.value=0.25", "backend.precision=bf16"], fake_pm)
    assert recipe.stages["second"].config.value == 0.25
    assert recipe.backend.precision == "bf16"


def test_override_of_an_unknown_stage_suggests_the_nearest(write_recipe, fake_pm):
    message = error_of(write_recipe(BASIC), fake_pm, ["stages.secnd.value=1"])
    assert "the recipe has no stage 'secnd' (did you mean 'second'?)" in message


def test_override_of_an_unknown_key_suggests_the_nearest(write_recipe, fake_pm):
    message = error_of(write_recipe(BASIC), fake_pm, ["stages.second.vlaue=1"])
    assert "unknown key 'stages.second.vlaue' (did you mean 'value'?)" in message


@pytest.mark.parametrize("override", ["stages.second.value", "=3", "stages..value=1"])
def test_malformed_override_shows_the_expected_form(write_recipe, fake_pm, override):
    assert "key.path=value" in error_of(write_recipe(BASIC), fake_pm, [override])


def test_defaults_reach_every_stage_that_has_the_setting(write_recipe, fake_pm):
    recipe = load_recipe(write_recipe("defaults: {value: 5}\n" + BASIC), [], fake_pm)
    assert recipe.stages["first"].config.value == 2.0  # the stage's own value wins
    assert recipe.stages["second"].config.value == 5.0


def test_a_default_no_stage_accepts_is_an_error(write_recipe, fake_pm):
    message = error_of(write_recipe("defaults: {vallue: 5}\n" + BASIC), fake_pm)
    assert "'defaults.vallue' is not a setting of any stage" in message and "did you mean 'value'" in message


def test_invalid_yaml_names_line_and_column(write_recipe, fake_pm):
    message = error_of(write_recipe("model: fake-model\nstages:\n  first: {plugin: count\n"), fake_pm)
    assert "invalid YAML at line" in message and "recipe.yaml" in message


def test_a_missing_recipe_file_is_named(tmp_path, fake_pm):
    assert "no such file" in error_of(tmp_path / "nope.yaml", fake_pm)


@pytest.mark.parametrize("text", ["model: fake-model\n", "model: fake-model\nstages: {}\n", "model: x\nstages: [a]\n"])
def test_a_recipe_without_stages_says_how_to_write_them(write_recipe, fake_pm, text):
    assert "the recipe has no stages" in error_of(write_recipe(text), fake_pm)


def test_a_recipe_without_model_is_an_error(write_recipe, fake_pm):
    assert "no `model:`" in error_of(write_recipe("stages:\n  a: {plugin: count}\n"), fake_pm)


def test_a_model_that_is_neither_source_folder_nor_hub_id_is_an_error(write_recipe, fake_pm):
    message = error_of(write_recipe(BASIC.replace("fake-model", "./no/such/folder")), fake_pm)
    assert "not a model source, a local folder, or a hub id" in message


def test_model_settings_are_validated_by_their_source(write_recipe, fake_pm):
    text = BASIC.replace("model: fake-model", "model: {source: tiny-llama, hiden_size: 64}")
    assert "unknown key 'model.hiden_size' (did you mean 'hidden_size'?)" in error_of(write_recipe(text), fake_pm)


def test_a_stage_that_is_not_a_mapping_is_an_error(write_recipe, fake_pm):
    message = error_of(write_recipe("model: fake-model\nstages:\n  first: count\n"), fake_pm)
    assert message == "'stages.first' must be a mapping of settings; got 'count'"


def test_a_stage_cannot_be_named_base(write_recipe, fake_pm):
    assert "'base' names the recipe's model" in error_of(write_recipe(BASIC.replace("first:", "base:")), fake_pm)


# ------------------------------------------------------------------------- inputs by capability, checks

CHAIN = """
model: tiny-llama
stages:
  sft: {data: demo_sft}
  rm: {data: demo_pref}
  ppo: {data: demo_prompts}
  dpo: {data: demo_pref}
"""


@pytest.fixture(scope="module")
def pm():
    from align.plugin_manager import get_plugin_manager

    return get_plugin_manager()


def test_inputs_default_to_the_stages_that_produce_what_they_take(write_recipe, pm):
    recipe = load_recipe(write_recipe(CHAIN), [], pm)
    assert recipe.stages["rm"].inputs == {"policy": "sft"}
    assert recipe.stages["ppo"].inputs == {"policy": "sft", "reward_model": "rm"}
    assert recipe.stages["dpo"].inputs == {"policy": "ppo"}  # the latest earlier policy


def test_a_role_is_refused_a_stage_that_produces_another_kind(write_recipe, pm):
    message = error_of(
        write_recipe(CHAIN.replace("{data: demo_prompts}", "{data: demo_prompts, reward_model: sft}")), pm
    )
    assert "'stages.ppo.reward_model': stage 'sft' produces a policy, but the reward_model must be a reward_model" in (
        message
    )


def test_a_stage_checks_its_settings_against_the_registries_when_the_recipe_loads(write_recipe, pm):
    text = CHAIN + "defaults:\n  score: {reward_function: sentimnet, prompts: demo_prompts_test}\n"
    message = error_of(write_recipe(text), pm)
    assert "unknown reward function 'sentimnet' (did you mean 'sentiment'?)" in message


def test_the_recipe_hook_gets_the_plugin_manager_and_can_refuse(write_recipe, pm):
    from align import hookimpl
    from align.plugin_manager import get_plugin_manager

    seen = []

    class Refuser:
        @hookimpl
        def align_recipe_loaded(self, recipe, plugins):
            seen.append(sorted(plugins.registry("data kind")))
            if "dpo" in recipe.stages:
                raise AlignError("this plugin serves no dpo stage")

    manager = get_plugin_manager()
    manager.add_plugin(Refuser(), "refuser")
    message = error_of(write_recipe(CHAIN), manager)
    assert message == "this plugin serves no dpo stage"
    assert seen == [["conversations", "feedback", "preferences", "prompts"]]


def test_align_config_stops_a_typo_in_a_later_stage_before_any_work(write_recipe):
    from conftest import run_align

    text = CHAIN + "defaults:\n  score: {reward_function: sentimnet, prompts: demo_prompts_test}\n"
    result = run_align("config", str(write_recipe(text)))
    assert result.returncode == 2 and "unknown reward function 'sentimnet'" in result.stderr
