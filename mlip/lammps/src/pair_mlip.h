/* pair_style mlip: evaluates a deployed mlip TorchScript model (Allegro or NequIP) in LAMMPS.

   Input script:
     units metal                             (or real: energies, forces, virials converted from eV)
     newton on                               (the default)
     pair_style mlip [min_distance D] [device cpu|cuda|auto]
                                             min_distance: atoms closer than D Å are an error
                                             (default 0.3, as in the ASE calculator; 0: no check);
                                             device: default auto (cuda where the plugin's torch
                                             sees a GPU, else cpu); env MLIP_DEVICE overrides,
                                             also cuda:N
     pair_coeff * * model.pt Si O            (one element name per LAMMPS atom type; NULL under
                                             pair_style hybrid/overlay leaves a type to other styles)

   compute stress/atom and centroid/stress/atom (hence heat/flux) work, from each edge's
   -r_ij (x) dE/dr_ij: see edge_virial_shares() in pair_mlip.cpp.

   A committee file (`mlip deploy A B C -o model.pt`) also gives its members' spread:
     compute unc all pair mlip               c_unc[1] energy spread (eV), c_unc[2] largest and
                                             c_unc[3] mean per-atom force spread (eV/Å)
     fix fu all pair 10 mlip force_uncertainty 0     per-atom force spread (eV/Å) as f_fu

   The model contract is described in mlip/deploy/model_file.py. Each MPI rank evaluates the
   model on its own atoms plus their ghosts, with LAMMPS' full neighbor list and zero edge
   shifts (periodic images are explicit ghost atoms). On a GPU each rank uses
   cuda:(node-local rank % GPUs visible); the graph is built on the host and each input moves to
   the device in one copy, the outputs come back in one. */

#ifndef LMP_PAIR_MLIP_H
#define LMP_PAIR_MLIP_H

#include "pair.h"

#include "mlip_model.h"

#include <memory>

#include <string>
#include <vector>

namespace LAMMPS_NS {

class PairMLIP : public Pair {
 public:
  PairMLIP(class LAMMPS *);
  ~PairMLIP() override;

  void compute(int eflag, int vflag) override;
  void settings(int narg, char **arg) override;
  void coeff(int narg, char **arg) override;
  void init_style() override;
  double init_one(int i, int j) override;
  void *extract(const char *name, int &dim) override;
  void *extract_peratom(const char *name, int &ncol) override;
  int pack_reverse_comm(int n, int first, double *buf) override;
  void unpack_reverse_comm(int n, int *list, double *buf) override;
  double memory_usage() override;

 protected:
  void allocate();
  void load_model(const std::string &path);
  void choose_device();
  void remove_net_force(double **rows, int width, const double *local_sum);
  void grow_member_arrays();
  void committee_spread(bool have_members, const std::vector<double> &member_energy_local);
  void warn_about_type_masses();

  std::unique_ptr<mlip::DeployedModel> model;    // TorchScript file or AOTInductor package
  std::string model_path;

  // Where the model runs: `pair_style mlip device ...` (or MLIP_DEVICE), resolved at pair_coeff.
  std::string device_request = "auto";    // "cpu", "cuda", "cuda:N" or "auto"
  torch::Device device = torch::kCPU;

  // From the model file's metadata (mlip/metadata.json)
  std::vector<std::string> type_names;    // the model's species; atom_types index into it
  double r_max = 0.0;                     // cutoff radius, Å
  double min_distance = 0.3;              // Å: closer atoms are an error (pair_style keyword)
  int message_passing_layers = 1;         // 1: strictly local (Allegro); >1: needs ghost edges
  bool direct_forces = false;             // force_head == "direct": no virial, net force removed here
  bool has_edge_gradients = false;        // the file's compiled potential.energies_and_forces exists:
                                          // per-edge dE/dr_ij, hence per-atom virials
  torch::ScalarType dtype = torch::kFloat64;
  double energy_unit = 1.0;               // 1 eV in the LAMMPS unit style's energy (metal 1, real
                                          // 23.06 kcal/mol); lengths are Å in both

  std::vector<int64_t> type_map;    // LAMMPS type (1-based) -> model type index, -1: NULL (the
                                    // type belongs to other styles of pair_style hybrid/overlay)

  // Committee files: the spread of the members (same definitions as mlip's ASE calculator).
  int num_members = 0;                    // M models in a committee file, 0 for a single model
  int nmax_members = 0;                   // rows allocated below (atom->nmax)
  double **member_forces = nullptr;       // (nmax, 3 * M) eV/Å, [i][k * M + m]: member m's force
                                          // component k; ghost parts are summed back to owners
  double *force_uncertainty = nullptr;    // (nmax,) eV/Å, owned atoms: sqrt(mean_m |F_m - mean F|^2)
  int uncertainty_trigger = 0;            // for `fix pair ... 1`; the spread is computed every step
  bool warned_no_member_forces = false;
  bool warned_centroid_message_passing = false;    // once per pair_coeff
  bool checked_type_masses = false;                // once per pair_coeff (masses may come after it)
};

}    // namespace LAMMPS_NS

#endif
