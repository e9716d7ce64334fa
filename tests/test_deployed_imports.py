"""A deployment's images carry Flower without Ray (Ray is for simulation only: see
deploy/local-images/build.sh), so nothing the ServerApp or the ClientApp loads may import Ray.

Session 13's batched Ray backend broke exactly this: ``server/loop.py`` imported
``fedrep.flower_runtime``, which imported Ray at the top, and the ServerApp of every deployment
died on import (seen only in the containers test, 17 minutes into CI). This checks it in a second.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from fedrep.registry import available_strategies


def test_server_client_apps_and_every_strategy_load_without_ray() -> None:
    names = available_strategies()
    assert "fedrep" in names and len(names) >= 9, names
    script = textwrap.dedent(f"""
        import sys
        sys.modules["ray"] = None  # any `import ray` now raises ImportError
        import clients.app
        import server.app
        from fedrep.registry import get_strategy
        for name in {names!r}:
            get_strategy(name)
        assert "ray" not in {{m.split(".")[0] for m, mod in sys.modules.items() if mod is not None}}
        print("loaded", len({names!r}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"loaded {len(names)}" in done.stdout
