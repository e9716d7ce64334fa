"""The multi-domain sets of KD3A (one client per domain, partition 0 the unlabelled target): what
configuration knows about them, their keys, the check of those keys, and the domain layout every
part of a run derives from them. The images come from ``domains.py`` / ``digit_five.py``; this
module imports no torch, so :mod:`fedrep.config` can read it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from fedrep.keys import DatasetSpec, KeySection

DEFAULT_DOMAINS = {"fmnist-domains": ("original", "inverted", "mnistm-style", "rotated", "lowres-noise"),
                   "digit-five": ("mnist", "mnistm", "svhn", "syn", "usps")}
FMNIST_DOMAINS = DatasetSpec("fmnist-domains", 10, ("cnn-bn", "kd3a-digit"), multi_domain=True)
DIGIT_FIVE = DatasetSpec("digit-five", 10, ("cnn-bn", "kd3a-digit"), multi_domain=True)

SPECS = (FMNIST_DOMAINS, DIGIT_FIVE)
MULTI_DOMAIN = tuple(spec.name for spec in SPECS)


def _expand_sources(sources: str) -> list[str]:
    """``"original*2, inverted"`` -> ``["original", "original", "inverted"]``: ``name*k`` gives a
    domain k source nodes, which split its data between them."""
    out: list[str] = []
    for item in (s.strip() for s in sources.split(",")):
        if not item:
            continue
        name, star, count = item.partition("*")
        if star and not (count.strip().isdigit() and int(count) >= 1):
            raise ValueError(f"source-domains item {item!r}: write name*k with a whole k >= 1, "
                             "e.g. original*3")
        out += [name.strip()] * (int(count) if star else 1)
    return out


def domain_layout(dataset: str, target: str, sources: str, irrelevant: bool) -> list[str]:
    """The domain of each partition of a multi-domain set: target first, then the sources
    (``sources`` comma-separated, ``name*k`` for k nodes of one domain, empty = all other
    domains), then the irrelevant source."""
    if dataset not in MULTI_DOMAIN:
        return []
    chosen = _expand_sources(sources) or [d for d in DEFAULT_DOMAINS[dataset] if d != target]
    return [target, *chosen, *(["irrelevant"] if irrelevant else [])]


def party_names(layout: list[str]) -> list[str]:
    """A unique name per partition for metrics: the domain, or ``domain-j`` (j = 1..k) when k
    nodes share it."""
    counts = {d: layout.count(d) for d in layout}
    seen: dict[str, int] = {}
    names = []
    for domain in layout:
        seen[domain] = seen.get(domain, 0) + 1
        names.append(domain if counts[domain] == 1 else f"{domain}-{seen[domain]}")
    return names


def domain_share(layout: list[str], partition: int) -> tuple[int, int]:
    """(j, k): partition is the j-th (0-based) of the k nodes sharing its domain."""
    domain = layout[partition]
    return layout[:partition].count(domain), layout.count(domain)


class DomainKeys(KeySection):
    """Keys of the multi-domain sets (KD3A's experiments)."""

    if TYPE_CHECKING:  # core keys, present in every run config this section is part of
        dataset: str
        num_clients: int

    target_domain: str = Field(
        "mnistm-style", description="Multi-domain sets: the unlabelled target domain (partition 0)."
    )
    source_domains: str = Field(
        "", description="Multi-domain sets: comma-separated labelled source domains (partitions 1..S); "
        "empty = every other domain of the set.",
    )
    irrelevant_source: bool = Field(
        False, description="fmnist-domains: add a source whose images carry no class information "
        "(KD3A's negative-transfer experiment).",
    )
    malicious_domain: str = Field(
        "", description="Multi-domain sets: a source domain whose labels are poisoned (empty = none).")
    poison_fraction: float = Field(
        0.0, ge=0, le=1, description="Share of the malicious domain's labels relabelled to (y+1) mod C.")

    def domain_layout(self) -> list[str]:
        """Multi-domain sets: the domain of each partition, target first."""
        return domain_layout(self.dataset, self.target_domain, self.source_domains, self.irrelevant_source)

    def party_names(self) -> list[str]:
        """Multi-domain sets: a unique name per partition (``domain`` or ``domain-j``)."""
        return party_names(self.domain_layout())

    @model_validator(mode="after")
    def _domains_fit(self) -> DomainKeys:
        if self.dataset not in MULTI_DOMAIN:
            return self
        domains = self.domain_layout()
        known = DEFAULT_DOMAINS[self.dataset]
        for name in domains:
            if name not in (*known, "irrelevant"):
                raise ValueError(f"domain {name!r} is not a domain of {self.dataset}; use {known}")
        if domains[0] in domains[1:]:
            raise ValueError(f"target {domains[0]!r} is also listed as a source ({domains[1:]}); "
                             "leave it out of source-domains")
        if self.num_clients != len(domains):
            raise ValueError(
                f"num-clients={self.num_clients}, but {self.dataset} with target {domains[0]!r} and "
                f"sources {domains[1:]} has {len(domains)} parties; set num-clients={len(domains)}")
        if self.malicious_domain and self.malicious_domain not in domains[1:]:
            raise ValueError(f"malicious-domain {self.malicious_domain!r} is not a source ({domains[1:]})")
        return self
