"""WebShop (Yao et al., 2022) on its own engine: `WebAgentTextEnv` of a WebShop checkout, in a text observation mode.

WebShop is a simulated shop of real Amazon products; each goal is a crowd-sourced instruction ("i need a 3 ounce
bottle of bright citrus deodorant for sensitive skin, and price lower than 50.00 dollars"). The agent searches,
clicks products and their options, and buys; WebShop's reward (0 to 1) scores how well the purchase fits the goal,
and an episode is a success when the reward is 1, as the ReAct and SAD papers count it.

WebShop is not on PyPI in a usable form (its products, search index and spaCy model are separate downloads), so
`WebShopSuite` imports the code of a checkout (`webshop_path`, see README "WebShop"), lazily: a missing checkout or
product file fails in the constructor, before any model loads, saying what to do. The products and the search index
load once per suite, on first use (one engine, shared by the episodes, which talk to it one at a time: its search
engine runs in the JVM and its sessions live in one dict). Each episode gets its own session of WebShop's goal
`task.setup` (its index in WebShop's fixed goal order, as ReAct's `fixed_{index}` sessions), so episodes of one goal
never share state.

An action the page does not offer (a search without a search box, a click on a button that is not there, anything
else) is not carried out: the observation is ReAct's "Invalid action!" and the step counts as invalid.
"""

from __future__ import annotations

import importlib
import importlib.util
import random
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..agent.loop import Task
from ..formats import WebAction, WebShopFormat
from .base import Environment, EnvironmentSuite, Transition

ENV_MODULE = "web_agent_site.envs.web_agent_text_env"
OBSERVATION_MODES = ("text", "text_rich")
# The goal indices of WebShop's splits (its baseline_models/env.py; ReAct and SAD test on the first 500).
GOAL_SPLITS = {"test": (0, 500), "eval": (500, 1500), "train": (1500, None)}
# The indexes WebShop's setup builds, by number of products (web_agent_site/engine/engine.py, init_search_engine).
NUM_PRODUCTS = (100, 1000, 100000, None)
INVALID_ACTION = "Invalid action!"
SETUP_HINT = (
    "clone WebShop (git clone https://github.com/princeton-nlp/WebShop.git), run its ./setup.sh -d small (or -d "
    "all) in a Python environment that also has trl_agent_distill, and set environment_options.webshop_path to the "
    "clone (README, section 'WebShop')"
)


@dataclass
class WebShopOptions:
    """`environment_options` of `environment: webshop`."""

    webshop_path: str | None = field(default=None, metadata={
        "help": "A WebShop checkout (the directory holding web_agent_site/); None: `web_agent_site` is importable."})
    observation_mode: str = field(default="text", metadata={
        "help": "WebShop's text observation: 'text' (page texts joined by ' [SEP] ') or 'text_rich' (one line per "
                "text, buttons marked '[button] ... [button_]')."})
    product_file: str | None = field(default=None, metadata={
        "help": "The products JSON; None: the checkout's DEFAULT_FILE_PATH (web_agent_site/utils.py; WebShop ships "
                "data/items_shuffle_1000.json there). WebShop reads the products' attributes from its "
                "DEFAULT_ATTR_PATH whatever this says: for all products switch both paths there, as its README says."})
    num_products: int | None = field(default=None, metadata={
        "help": "Load the first N products of the file and search WebShop's index of that size: 100, 1000, 100000, "
                "or None for all products and the full index."})
    human_goals: bool = field(default=True, metadata={
        "help": "Goals from the crowd-sourced instructions (as the papers) rather than WebShop's synthetic ones."})
    goal_splits: dict[str, Any] = field(default_factory=lambda: dict(GOAL_SPLITS), metadata={
        "help": "split -> [first, end) goal indices (end null: to the last goal). Default: WebShop's test 0-499, "
                "eval 500-1499, train 1500 to the end."})
    seed: int = field(default=0, metadata={
        "help": "Python's `random` is seeded with this before WebShop loads: it draws product prices and each "
                "goal's price limit from it, so the same seed gives the same goals."})
    max_steps: int = field(default=15, metadata={
        "help": "Replies per episode, thoughts included (ReAct's WebShop runs stop after 15)."})

    def __post_init__(self) -> None:
        if self.observation_mode not in OBSERVATION_MODES:
            raise ValueError(f"observation_mode must be one of {OBSERVATION_MODES}, got {self.observation_mode!r}.")
        if self.num_products not in NUM_PRODUCTS:
            raise ValueError(f"num_products must be one of {NUM_PRODUCTS} (the search indexes WebShop builds), got "
                             f"{self.num_products!r}.")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}.")
        self.goal_splits = {name: _goal_range(name, bounds) for name, bounds in self.goal_splits.items()}


def _goal_range(name: str, bounds: Any) -> tuple[int, int | None]:
    try:
        first, end = bounds
        valid = isinstance(first, int) and first >= 0 and (end is None or (isinstance(end, int) and end > first))
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"goal_splits[{name!r}] must be [first, end) goal indices with 0 <= first < end (end null for "
                         f"the last goal), got {bounds!r}.")
    return first, end


class WebShopSuite(EnvironmentSuite):
    """WebShop's goals as tasks and its engine as environments (see the module docstring)."""

    name = "webshop"
    options_class = WebShopOptions

    def __init__(self, options: WebShopOptions | None = None):
        self.options = options or WebShopOptions()
        self.max_steps = self.options.max_steps
        self._format = WebShopFormat()
        module = _import_engine(self.options.webshop_path)
        self._text_env = module.WebAgentTextEnv
        self._product_file = _product_file(self.options.product_file, module)
        self._lock = threading.RLock()
        self._server: Any = None

    @property
    def format(self) -> WebShopFormat:
        return self._format

    def tasks(self, split: str) -> list[Task]:
        """The goals of `split` (`goal_splits`), with their instruction as the question and their index as setup."""
        if split not in self.options.goal_splits:
            raise ValueError(f"Unknown WebShop split {split!r}; the splits are {sorted(self.options.goal_splits)} "
                             "(environment_options.goal_splits).")
        goals = self._engine().goals
        first, end = self.options.goal_splits[split]
        if first >= len(goals) or (end or 0) > len(goals):
            last = "the last" if end is None else end - 1
            raise ValueError(
                f"WebShop split {split!r} is goals {first} to {last}, but the products loaded give {len(goals)} goals: "
                "load all products (setup.sh -d all, then DEFAULT_FILE_PATH and DEFAULT_ATTR_PATH in the checkout's "
                "web_agent_site/utils.py switched to the full files, num_products null) or set "
                "environment_options.goal_splits.")
        return [Task(task_id=f"fixed_{index}", question=goals[index]["instruction_text"], setup=index)
                for index in range(first, len(goals) if end is None else end)]

    def make(self) -> WebShopEnvironment:
        server = self._engine()
        with self._lock:
            # A unique prefix keeps each episode's session apart from the others' in the shared engine.
            text_env = self._text_env(observation_mode=self.options.observation_mode, server=server,
                                      session_prefix=f"{uuid.uuid4().hex}_")
        return WebShopEnvironment(text_env, self._lock)

    def _engine(self) -> Any:
        """WebShop's server (products, search index, goals), loaded on first use."""
        with self._lock:
            if self._server is None:
                random.seed(self.options.seed)
                first = self._text_env(observation_mode=self.options.observation_mode, file_path=self._product_file,
                                       num_products=self.options.num_products, human_goals=self.options.human_goals)
                self._server = first.server
            return self._server


class WebShopEnvironment(Environment):
    """One episode in WebShop: a session of the task's goal on the suite's shared engine."""

    def __init__(self, text_env: Any, lock: threading.RLock):
        self.text_env = text_env
        self._lock = lock

    def reset(self, task: Task) -> Transition:
        """Open a session of goal `task.setup`; the observation is the shop's first page, the instruction on it."""
        if isinstance(task.setup, bool) or not isinstance(task.setup, int):
            raise ValueError(f"Task {task.task_id!r} has no WebShop goal index as its setup (got {task.setup!r}): "
                             "take the tasks from WebShopSuite.tasks(split).")
        with self._lock:
            observation, _ = self.text_env.reset(session=task.setup)
            return Transition(observation, info=self._info())

    def step(self, action: WebAction) -> Transition:
        with self._lock:
            if not self._offered(action):
                return Transition(INVALID_ACTION, valid=False, info=self._info())
            observation, reward, done, _ = self.text_env.step(action.text)
            reward = float(reward)
            return Transition(observation, done=bool(done), success=bool(done) and reward == 1.0, reward=reward,
                              info=self._info())

    def _offered(self, action: WebAction) -> bool:
        """Whether the page offers `action`: a search needs the search box and keywords, a click a button on the
        page (matched without case, as WebShop does)."""
        available = self.text_env.get_available_actions()
        if action.name == "search":
            return available["has_search_bar"] and bool(action.argument.strip())
        if action.name == "click":
            argument = action.argument.lower()
            return argument != "search" and argument in available["clickables"]
        return False

    def _info(self) -> dict[str, Any]:
        available = self.text_env.get_available_actions()
        return {"instruction": self.text_env.instruction_text, "has_search_bar": available["has_search_bar"],
                "clickables": list(available["clickables"])}


def _import_engine(webshop_path: str | None) -> Any:
    """The module of `WebAgentTextEnv` in the checkout at `webshop_path` (or in the importable `web_agent_site`)."""
    if webshop_path is not None:
        root = Path(webshop_path).expanduser().resolve()
        if not (root / "web_agent_site" / "envs" / "web_agent_text_env.py").is_file():
            raise FileNotFoundError(f"No WebShop checkout at {str(root)!r} (it has no "
                                    f"web_agent_site/envs/web_agent_text_env.py): {SETUP_HINT}.")
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
    elif importlib.util.find_spec("web_agent_site") is None:
        raise ImportError(f"WebShop is not importable (no module web_agent_site): {SETUP_HINT}.")
    try:
        module = importlib.import_module(ENV_MODULE)
    except (ImportError, OSError) as error:  # a missing requirement, or spaCy's missing model (OSError)
        raise ImportError(f"WebShop's code could not be imported: {type(error).__name__}: {error}. Install its "
                          "requirements here (pip install -r requirements.txt and python -m spacy download "
                          f"en_core_web_lg in the checkout; Java for its search index), or {SETUP_HINT}.") from error
    if webshop_path is not None:
        location = Path(module.__file__).resolve()
        if root not in location.parents:
            raise ImportError(f"web_agent_site was already imported from {str(location)!r}, not from the checkout "
                              f"{str(root)!r}: use one WebShop checkout per process.")
    return module


def _product_file(product_file: str | None, module: Any) -> str:
    """The products JSON to load: `product_file`, else the checkout's default (`DEFAULT_FILE_PATH`)."""
    if product_file is not None:
        path, what = Path(product_file).expanduser(), "environment_options.product_file"
    else:
        path, what = Path(module.DEFAULT_FILE_PATH), "WebShop's default product file"
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist: run WebShop's ./setup.sh -d small (1,000 "
                                "products) or -d all in the checkout, or point product_file at the products JSON.")
    return str(path)
