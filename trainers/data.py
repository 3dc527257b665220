"""Training data: the synthetic games dataset, CSV loading, and the data fingerprint.

The games dataset is deterministic from its seed: 30 teams whose strength drifts from season to
season and within one, home advantage, and features computed *as of* each game from earlier
results only (an Elo rating difference, recent form, rest days, win rate so far). The bookmaker
sees the true probability through a little noise and adds a margin to both prices, so beating
the odds is possible but hard, as it is for real.

Any CSV with a ``season`` column, a 0/1 target and the two decimal odds columns works the same;
every other numeric column is a feature.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from evo.errors import BadInput

SEASONS = (2003, 2024)
TARGET = "home_win"
ODDS = ("odds_home", "odds_away")
NOT_FEATURES = {"season", "game_id", "home_team", "away_team", "date", TARGET, *ODDS}
SYNTHETIC = "games"


@dataclass
class Dataset:
    columns: dict[str, np.ndarray]
    sha256: str
    source: str

    @property
    def rows(self) -> int:
        return len(self.columns["season"])

    def features(self, target: str = TARGET, odds: tuple[str, str] = ODDS) -> list[str]:
        skip = NOT_FEATURES | {target, *odds}
        return [c for c in self.columns if c not in skip]


def games(rows: int = 5000, seed: int = 2024, teams: int = 30,
          seasons: tuple[int, int] = SEASONS, margin: float = 0.05) -> dict[str, np.ndarray]:
    """The synthetic games table, as columns; the same arguments give the same bytes."""
    rng = np.random.default_rng(seed)
    years = np.arange(seasons[0], seasons[1] + 1)
    per = np.full(len(years), rows // len(years))
    per[: rows - per.sum()] += 1
    strength = rng.normal(0.0, 0.5, teams)
    home_adv, rest_effect, book_noise = 0.25, 0.03, 0.3
    # The bookmaker sees the true logit through noise and shrinks toward the mean, so that its
    # prices are calibrated: no edge comes from its noise alone.
    shrink = 0.5 / (0.5 + book_noise ** 2)
    out: dict[str, list] = {k: [] for k in (
        "season", "game_id", "home_team", "away_team", "elo_diff", "home_form", "away_form",
        "home_rest", "away_rest", "home_winpct", "away_winpct", "prev_winpct_diff", TARGET,
        *ODDS)}
    gid = 0
    elo = np.zeros(teams)
    prev_pct = np.full(teams, 0.5)
    for year, n in zip(years, per):
        strength = 0.8 * strength + rng.normal(0.0, 0.3, teams)  # seasons carry over, partly
        elo *= 0.75  # ratings regress toward the mean between seasons
        form: list[list[float]] = [[] for _ in range(teams)]
        wins, played = np.zeros(teams), np.zeros(teams)
        last_day = np.full(teams, -7.0)
        for g in range(n):
            day = g * 180.0 / max(n, 1)
            h, a = rng.choice(teams, 2, replace=False)
            strength[[h, a]] += rng.normal(0.0, 0.02, 2)  # form drifts within the season
            rest_h, rest_a = min(day - last_day[h], 14.0), min(day - last_day[a], 14.0)
            logit = home_adv + strength[h] - strength[a] + rest_effect * (rest_h - rest_a)
            y = float(rng.random() < 1.0 / (1.0 + np.exp(-logit)))
            seen = home_adv + shrink * (logit + rng.normal(0.0, book_noise) - home_adv)
            p_book = 1.0 / (1.0 + np.exp(-seen))
            out["season"].append(int(year))
            out["game_id"].append(gid)
            out["home_team"].append(int(h))
            out["away_team"].append(int(a))
            out["elo_diff"].append(round(float(elo[h] - elo[a]), 4))
            # the last five results are 0s and 1s: their plain mean is exact (np.mean's too)
            out["home_form"].append(round(sum(form[h][-5:]) / len(form[h][-5:]), 4)
                                    if form[h] else 0.5)
            out["away_form"].append(round(sum(form[a][-5:]) / len(form[a][-5:]), 4)
                                    if form[a] else 0.5)
            out["home_rest"].append(round(float(rest_h), 2))
            out["away_rest"].append(round(float(rest_a), 2))
            out["home_winpct"].append(round(float((wins[h] + 1) / (played[h] + 2)), 4))
            out["away_winpct"].append(round(float((wins[a] + 1) / (played[a] + 2)), 4))
            out["prev_winpct_diff"].append(round(float(prev_pct[h] - prev_pct[a]), 4))
            out[TARGET].append(int(y))
            out["odds_home"].append(round(float(1.0 / (p_book * (1 + margin))), 3))
            out["odds_away"].append(round(float(1.0 / ((1 - p_book) * (1 + margin))), 3))
            # as-of updates, after the game's features were taken
            expected = 1.0 / (1.0 + 10 ** (-(elo[h] + 35.0 - elo[a]) / 400.0))
            elo[h] += 24.0 * (y - expected)
            elo[a] -= 24.0 * (y - expected)
            form[h].append(y)
            form[a].append(1.0 - y)
            wins[h] += y
            wins[a] += 1.0 - y
            played[[h, a]] += 1
            last_day[[h, a]] = day
            gid += 1
        prev_pct = (wins + 1) / (played + 2)
    return {k: np.asarray(v) for k, v in out.items()}


def to_csv(columns: dict[str, np.ndarray]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    names = list(columns)
    w.writerow(names)
    for row in zip(*(columns[n].tolist() for n in names)):
        w.writerow(row)
    return buf.getvalue().encode()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load(data: str = SYNTHETIC, *, rows: int = 5000, data_seed: int = 2024,
         target: str = TARGET, odds: tuple[str, str] = ODDS) -> Dataset:
    """``games`` (synthetic, made in memory) or a CSV path; fingerprinted either way.

    A warm worker runs many trials on the same data, so the last few datasets are kept in
    memory: a file is read again when its size or modification time changed. Callers never
    modify the arrays."""
    key: tuple = (data, rows, data_seed, target, tuple(odds))
    if data != SYNTHETIC:
        try:
            st = Path(data).stat()
            key += (st.st_size, st.st_mtime_ns)
        except OSError:
            pass
    return _load(key)


@lru_cache(maxsize=4)
def _load(key: tuple) -> Dataset:
    data, rows, data_seed, target, odds = key[:5]
    if data == SYNTHETIC:
        cols = games(rows=rows, seed=data_seed)
        raw = to_csv(cols)
        return Dataset(cols, hashlib.sha256(raw).hexdigest(), f"games(rows={rows}, seed={data_seed})")
    path = Path(data)
    if not path.is_file():
        raise BadInput(f"data {data!r}: no such file (give a CSV path, or `games`)")
    raw = path.read_bytes()
    cols = parse_csv(raw, str(path), target=target, odds=odds)
    return Dataset(cols, hashlib.sha256(raw).hexdigest(), str(path))


def parse_csv(raw: bytes, where: str, *, target: str = TARGET,
              odds: tuple[str, str] = ODDS) -> dict[str, np.ndarray]:
    reader = csv.reader(io.StringIO(raw.decode("utf-8")))
    try:
        header = next(reader)
    except StopIteration:
        raise BadInput(f"{where}: empty file") from None
    need = ["season", target, *odds]
    missing = [c for c in need if c not in header]
    if missing:
        raise BadInput(f"{where}: missing column(s) {', '.join(missing)} "
                       f"(expected season, {target}, {odds[0]}, {odds[1]})")
    values: list[list[float]] = [[] for _ in header]
    for line_no, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise BadInput(f"{where}:{line_no}: {len(row)} fields, the header has {len(header)}")
        for i, v in enumerate(row):
            try:
                values[i].append(float(v))
            except ValueError:
                if header[i] in need:
                    raise BadInput(f"{where}:{line_no}: column {header[i]}: expected a number, "
                                   f"got {v!r}") from None
                values[i].append(np.nan)
    cols = {h: np.asarray(v) for h, v in zip(header, values)}
    # a column that is not numbers at all (names, dates) is not a feature
    return {h: c for h, c in cols.items() if h in need or not np.isnan(c).all()}
