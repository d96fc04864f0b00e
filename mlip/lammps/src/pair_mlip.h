/* pair_style mlip: evaluates a deployed mlip TorchScript model (Allegro or NequIP) in LAMMPS.

   Input script:
     units metal
     newton on                               (the default)
     pair_style mlip
     pair_coeff * * model.pt Si O            (one element name per LAMMPS atom type)

   The model contract is described in mlip/deploy/model_file.py. Each MPI rank evaluates the
   model on its own atoms plus their ghosts, with LAMMPS' full neighbor list and zero edge
   shifts (periodic images are explicit ghost atoms). */

#ifndef LMP_PAIR_MLIP_H
#define LMP_PAIR_MLIP_H

#include "pair.h"

#include <torch/script.h>

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

 protected:
  void allocate();
  void load_model(const std::string &path);
  void remove_net_force(const double local_sum[3]);

  torch::jit::Module model;
  std::string model_path;

  // From the model file's metadata (mlip/metadata.json)
  std::vector<std::string> type_names;    // the model's species; atom_types index into it
  double r_max = 0.0;                     // cutoff radius, Å
  int message_passing_layers = 1;         // 1: strictly local (Allegro); >1: needs ghost edges
  bool direct_forces = false;             // force_head == "direct": no virial, net force removed here
  torch::ScalarType dtype = torch::kFloat64;

  std::vector<int64_t> type_map;    // LAMMPS type (1-based) -> model type index
};

}    // namespace LAMMPS_NS

#endif
