"""Install tools/tv_cpu_shim.py into this interpreter's site-packages with a `.pth` hook (idempotent)."""

import shutil
import sysconfig
from pathlib import Path

site = Path(sysconfig.get_paths()["purelib"])
shutil.copy(Path(__file__).with_name("tv_cpu_shim.py"), site / "tv_cpu_shim.py")
(site / "zz_tv_cpu_shim.pth").write_text("import tv_cpu_shim\n")
