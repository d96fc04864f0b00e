/* A deployed mlip model behind the contract of mlip/deploy/model_file.py, whatever its container:
   a TorchScript archive (`mlip deploy -o model.pt`) or an AOTInductor package (`-o model.pt2`).
   Both are zip archives with the metadata at extra/mlip/metadata.json; the container is told
   apart by content (compiled AOTInductor code under data/aotinductor/), not by the file name. */

#ifndef MLIP_MODEL_H
#define MLIP_MODEL_H

#include <torch/torch.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>

namespace mlip {

using Outputs = std::unordered_map<std::string, torch::Tensor>;

class DeployedModel {
 public:
  virtual ~DeployedModel() = default;
  // positions (N, 3) and edge_shifts (E, 3) in the model's dtype, atom_types (N,) and
  // edge_index (2, E) int64, the first num_local nodes owned; outputs by name
  // ("atomic_energies", "forces", "virial", "member_forces", ...).
  virtual Outputs forward(const torch::Tensor &positions, const torch::Tensor &atom_types,
                          const torch::Tensor &edge_index, const torch::Tensor &edge_shifts,
                          int64_t num_local) = 0;
  // Whether forward_with_edge_gradients() works: TorchScript files written by `mlip deploy` with a
  // gradient head (their compiled potential.energies_and_forces); not AOTInductor packages.
  virtual bool has_edge_gradients() const { return false; }
  // forward()'s outputs plus "edge_vectors" (E, 3) and "edge_gradients" (E, 3), dE/dr_ij of each
  // edge (per-atom virials: pair_mlip.cpp). Throws std::runtime_error where not available.
  virtual Outputs forward_with_edge_gradients(const torch::Tensor & /*positions*/, const torch::Tensor & /*atom_types*/,
                                              const torch::Tensor & /*edge_index*/, const torch::Tensor & /*edge_shifts*/,
                                              int64_t /*num_local*/)
  {
    throw std::runtime_error("this model file gives no per-edge gradients");
  }
};

// Loads the model at `path` for `device` (inputs are then expected there) and returns it with its
// metadata JSON text (empty if the archive has none). Throws std::runtime_error with a one-line
// reason: not a readable archive, or an AOTInductor package built by another torch version or for
// another device.
std::unique_ptr<DeployedModel> load_deployed_model(const std::string &path, const torch::Device &device,
                                                   std::string &metadata);

}    // namespace mlip

#endif
