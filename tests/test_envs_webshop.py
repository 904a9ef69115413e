"""The WebShop adapter and format, against a STAND-IN of a WebShop checkout (tests/fixtures/webshop_standin).

WebShop itself cannot be installed here (its products, search index and spaCy model are external downloads): the
stand-in has WebShop's `WebAgentTextEnv` interface over three invented products. What these tests show is that the
adapter drives that interface as WebShop defines it; they do not run WebShop.
"""

import shutil
import sys
from pathlib import Path

import pytest

from trl_agent_distill.agent import EnvironmentAgent, PolicyBackend, Task
from trl_agent_distill.envs import load_environment
from trl_agent_distill.envs.webshop import INVALID_ACTION, WebShopSuite
from trl_agent_distill.formats import ParsedReply, ParseError, WebAction, WebShopFormat
from trl_agent_distill.segmentation import segment_messages, segment_text
from trl_agent_distill.spans import Span

STANDIN = Path(__file__).parent / "fixtures" / "webshop_standin"
# The stand-in's four goals: deodorant (0), red mug (1), blue mug (2), socks (3).
SPLITS = {"test": [0, 2], "train": [2, None]}
SOLVE_RED_MUG = ["Action: search[ceramic coffee mug]", "Action: think[B0STAND002 is a dishwasher safe mug.]",
                 "Action: click[B0STAND002]", "Action: click[red]", "Action: click[Buy Now]"]


@pytest.fixture(autouse=True)
def fresh_import_of_the_standin(monkeypatch):
    """Each test imports the stand-in anew and leaves `sys.path` as it found it."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in [name for name in sys.modules if name == "web_agent_site" or name.startswith("web_agent_site.")]:
        del sys.modules[name]


def standin_suite(**options) -> WebShopSuite:
    return load_environment("webshop", {"webshop_path": str(STANDIN), "goal_splits": SPLITS, **options})


def scripted(replies):
    """A policy that writes `replies` in order, one per assistant turn of the episode."""
    return PolicyBackend(lambda request: replies[sum(m["role"] == "assistant" for m in request.messages)])


# ---------------------------------------------------------------------------------------------- setup errors
def test_a_missing_checkout_fails_in_the_constructor_saying_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No WebShop checkout at .*git clone https://github.com/princeton-nlp"):
        load_environment("webshop", {"webshop_path": str(tmp_path)})


def test_without_a_checkout_web_agent_site_must_be_importable(monkeypatch):
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if str(STANDIN) not in entry])
    with pytest.raises(ImportError, match="WebShop is not importable .*webshop_path"):
        load_environment("webshop")


def test_a_missing_product_file_fails_naming_it(tmp_path):
    missing = tmp_path / "items_shuffle.json"
    with pytest.raises(FileNotFoundError, match=f"product_file '{missing}' does not exist: run WebShop's ./setup.sh"):
        standin_suite(product_file=str(missing))


def test_a_missing_default_product_file_fails_naming_it(tmp_path):
    checkout = tmp_path / "checkout"
    shutil.copytree(STANDIN, checkout)
    (checkout / "data" / "items_shuffle_1000.json").unlink()
    with pytest.raises(FileNotFoundError, match="WebShop's default product file .*items_shuffle_1000.json"):
        load_environment("webshop", {"webshop_path": str(checkout)})


def test_a_second_checkout_in_one_process_is_refused(tmp_path):
    standin_suite()
    shutil.copytree(STANDIN, tmp_path / "other")
    with pytest.raises(ImportError, match="already imported from .*use one WebShop checkout per process"):
        load_environment("webshop", {"webshop_path": str(tmp_path / "other")})


@pytest.mark.parametrize(("options", "message"), [
    ({"observation_mode": "html"}, "observation_mode must be one of"),
    ({"num_products": 500}, "num_products must be one of"),
    ({"goal_splits": {"test": [5, 2]}}, r"goal_splits\['test'\] must be \[first, end\)"),
    ({"max_steps": 0}, "max_steps must be >= 1"),
    ({"observation": "text"}, "Did you mean 'observation_mode'"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        load_environment("webshop", {"webshop_path": str(STANDIN), **options})


# ---------------------------------------------------------------------------------------------- tasks
def test_tasks_are_goals_of_the_split_and_products_load_once():
    suite = standin_suite()
    engine = sys.modules["web_agent_site.envs.web_agent_text_env"].SimServer
    assert engine.loads == 0  # nothing loads before it is needed
    test = suite.tasks("test")
    assert [(task.task_id, task.setup) for task in test] == [("fixed_0", 0), ("fixed_1", 1)]
    assert test[1].question.startswith("i want a red ceramic coffee mug")
    assert [task.setup for task in suite.tasks("train")] == [2, 3]
    suite.make()
    suite.make()
    assert engine.loads == 1
    assert suite.max_steps == 15 and isinstance(suite.format, WebShopFormat)


def test_unknown_or_too_large_splits_fail_saying_what_to_do():
    with pytest.raises(ValueError, match=r"Unknown WebShop split 'dev'; the splits are \['test', 'train'\]"):
        standin_suite().tasks("dev")
    with pytest.raises(ValueError, match="split 'test' is goals 0 to 499, but the products loaded give 4 goals"):
        load_environment("webshop", {"webshop_path": str(STANDIN)}).tasks("test")  # the papers' splits
    with pytest.raises(ValueError, match="split 'train' is goals 1500 to the last, but the products loaded give 4"):
        load_environment("webshop", {"webshop_path": str(STANDIN)}).tasks("train")


# ---------------------------------------------------------------------------------------------- environment
def test_an_episode_on_the_engine_buys_and_scores():
    suite = standin_suite()
    environment = suite.make()
    first = environment.reset(Task("fixed_1", "", setup=1))
    assert first.observation.startswith("WebShop [SEP] Instruction: [SEP] i want a red ceramic coffee mug")
    assert first.info["has_search_bar"] and first.info["instruction"].startswith("i want a red")
    results = environment.step(WebAction("search", "ceramic coffee mug"))
    assert "B0STAND002 [SEP] Ceramic Coffee Mug" in results.observation and results.valid and not results.done
    environment.step(WebAction("click", "B0STAND002"))
    environment.step(WebAction("click", "red"))
    bought = environment.step(WebAction("click", "Buy Now"))
    assert bought.done and bought.success and bought.reward == 1.0
    assert "Your score (min 0.0, max 1.0) [SEP] 1.0" in bought.observation


def test_a_partial_match_is_rewarded_but_not_a_success():
    environment = standin_suite().make()
    environment.reset(Task("fixed_1", "", setup=1))
    for action in [WebAction("search", "mug"), WebAction("click", "b0stand002"), WebAction("click", "blue"),
                   WebAction("click", "buy now")]:
        bought = environment.step(action)
    assert bought.done and not bought.success and 0 < bought.reward < 1


@pytest.mark.parametrize("action", [
    WebAction("click", "B0STAND002"),  # not on the search page
    WebAction("click", "search"),  # the search box is not a button
    WebAction("search", " "),
    WebAction("think", "a thought never reaches the shop"),
])
def test_actions_the_page_does_not_offer_are_invalid_and_change_nothing(action):
    environment = standin_suite().make()
    first = environment.reset(Task("fixed_0", "", setup=0))
    rejected = environment.step(action)
    assert rejected == type(rejected)(INVALID_ACTION, valid=False, info=first.info)
    assert environment.step(WebAction("search", "deodorant")).valid  # still on the search page


def test_a_search_needs_the_search_box():
    environment = standin_suite().make()
    environment.reset(Task("fixed_0", "", setup=0))
    environment.step(WebAction("search", "deodorant"))  # results: no search box (WebShop's engine would search)
    assert not environment.step(WebAction("search", "socks")).valid
    assert environment.step(WebAction("click", "Back to Search")).info["has_search_bar"]


def test_a_task_without_a_goal_index_is_refused():
    with pytest.raises(ValueError, match="Task 'q1' has no WebShop goal index as its setup .*WebShopSuite.tasks"):
        standin_suite().make().reset(Task("q1", "buy a mug"))


def test_episodes_of_one_goal_have_their_own_sessions():
    suite = standin_suite()
    one, two = suite.make(), suite.make()
    one.reset(Task("fixed_0", "", setup=0))
    two.reset(Task("fixed_0", "", setup=0))
    one.step(WebAction("search", "deodorant"))
    assert two.step(WebAction("search", "deodorant")).valid  # two is still on its search page


# ---------------------------------------------------------------------------------------------- format
def test_the_format_parses_one_action_per_reply():
    fmt = WebShopFormat()
    assert fmt.parse("Action: click[ Buy Now ]\nAction: click[< Prev]") == ParsedReply(
        "Action: click[ Buy Now ]", WebAction("click", "Buy Now"))
    assert fmt.parse("Thought: a mug\naction 3: Search[red [ceramic] mug]").action == WebAction(
        "search", "red [ceramic] mug")
    assert fmt.reply_without_environment(WebAction("think", "hm")) == "OK."
    assert fmt.reply_without_environment(WebAction("click", "red")) is None
    assert fmt.action_key(WebAction("click", "Buy  Now")) == fmt.action_key(WebAction("click", "buy now"))
    assert fmt.action_key(WebAction("search", "red mug")) != fmt.action_key(WebAction("click", "red mug"))
    assert fmt.write("", WebAction("search", "red mug")) == "Action: search[red mug]"
    with pytest.raises(ValueError, match="holds one action: write the thought as its own reply"):
        fmt.write("I want a mug", WebAction("search", "red mug"))


@pytest.mark.parametrize(("reply", "truncated", "cause"), [
    ("I should search for a mug.", False, "no action was found"),
    ("Action: buy[B0STAND002]", False, "unknown action 'buy'"),
    ("Action: think[the red one is", True, "the reply ran out of tokens before an action"),
])
def test_replies_without_an_action_say_what_was_expected(reply, truncated, cause):
    parsed = WebShopFormat().parse(reply, truncated=truncated)
    assert isinstance(parsed, ParseError) and parsed.content == reply
    assert parsed.message == (f"Error: {cause}. Reply with one line 'Action: search[keywords]', "
                              "'Action: click[button]' or 'Action: think[thoughts]'.")


# ---------------------------------------------------------------------------------------------- episodes
def test_an_agent_episode_round_trips_through_segmentation():
    suite = standin_suite()
    replies = [SOLVE_RED_MUG[0], "Action: click[B0STAND009]", *SOLVE_RED_MUG[1:]]
    episode, = EnvironmentAgent(suite, max_steps=suite.max_steps).run(scripted(replies), suite.tasks("test")[1:])
    assert (episode.stop_reason, episode.success, episode.reward) == ("done", True, 1.0)
    assert (episode.steps, episode.invalid_actions) == (6, 1)
    messages = episode.messages
    assert messages[1]["content"].startswith("WebShop [SEP] Instruction: [SEP] i want a red ceramic coffee mug")
    assert [m["content"] for m in messages[2::2]] == replies
    observations = [m["content"] for m in messages[3::2]]
    assert observations[1] == f"Observation: {INVALID_ACTION}" and observations[2] == "Observation: OK."

    kinds = {"think": "reason", "search": "act", "click": "act"}
    expected = [[Span("other", 0, len(m["content"]))] if m["role"] != "assistant" else
                [Span(kinds[m["content"].split(": ")[1].split("[")[0]], 0, len(m["content"]))] for m in messages]
    for style in ("react", "auto"):
        assert segment_messages(messages, style=style) == expected

    # The same episode as one ReAct transcript: the pages are observations.
    transcript = "\n".join(m["content"] for m in messages[1:])
    spans = segment_text(transcript, style="react")
    assert suite.format.segment(transcript, assistant=False) == spans
    kinds_in_order = [span.kind for span in spans]
    assert kinds_in_order == ["other"] + ["act", "obs"] * 2 + ["reason", "obs"] + ["act", "obs"] * 2 + ["act"]
    assert transcript[spans[-2].start : spans[-2].end].startswith("Observation: WebShop [SEP] Instruction:")


def test_episodes_end_at_the_step_cap_and_self_consistency_votes_on_the_normalised_action():
    suite = standin_suite(max_steps=2)
    thinking = PolicyBackend(lambda request: "Action: think[which mug?]")
    episode, = EnvironmentAgent(suite, max_steps=suite.max_steps).run(thinking, suite.tasks("test")[:1])
    assert (episode.stop_reason, episode.steps, episode.success) == ("max_steps", 2, None)

    def candidates(request):
        steps = sum(m["role"] == "assistant" for m in request.messages)
        return [SOLVE_RED_MUG[0], "Action: search[Ceramic  COFFEE mug]", "Action: search[socks]"] if steps == 0 else \
            [SOLVE_RED_MUG[1 + steps]] * 3  # after the search: open the mug, pick red (no thoughts)
    agent = EnvironmentAgent(standin_suite(max_steps=4), max_steps=4, self_consistency={"n": 3})
    episode, = agent.run(PolicyBackend(candidates), standin_suite().tasks("test")[1:])
    assert episode.votes[0]["group_sizes"] == [2, 1] and episode.votes[0]["chosen"] == 0
    assert episode.success and episode.reward == 1.0
