/* Loading of deployed models: see mlip_model.h. */

#include "mlip_model.h"

#include "json.h"

#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/headeronly/version.h>
#include <torch/script.h>

#include <stdexcept>
#include <vector>

namespace mlip {
namespace {

const char *const METADATA_RECORD = "extra/mlip/metadata.json";
const char *const AOTI_RECORDS = "data/aotinductor/";

std::string first_line(const std::string &text)
{
  const auto end = text.find('\n');
  return end == std::string::npos ? text : text.substr(0, end);
}

class TorchScriptModel : public DeployedModel {
 public:
  TorchScriptModel(const std::string &path, const torch::Device &device)
  {
    // Without the graph executor's optimizations (here and at every call): its own autodiff made
    // a NequIP force call 1.7x slower than eager PyTorch on CPU (torch 2.13); see model_file.py.
    torch::jit::GraphOptimizerEnabledGuard no_executor_optimizations(false);
    // Mapped at load, every tensor of the archive lands on the device: parameters and buffers,
    // and also tensors kept as plain attributes (the Clebsch-Gordan tables), which a later
    // module.to(device) would leave on the host. The file itself is device-neutral.
    module = torch::jit::load(path, device);
    module.eval();
    // Inference only: with frozen weights autograd saves just what forces and the virial need.
    for (auto parameter : module.parameters()) parameter.requires_grad_(false);
  }

  Outputs forward(const torch::Tensor &positions, const torch::Tensor &atom_types,
                  const torch::Tensor &edge_index, const torch::Tensor &edge_shifts,
                  int64_t num_local) override
  {
    std::vector<torch::jit::IValue> inputs{positions, atom_types, edge_index, edge_shifts, num_local};
    torch::jit::GraphOptimizerEnabledGuard no_executor_optimizations(false);
    const auto result = module.forward(inputs).toGenericDict();
    Outputs outputs;
    for (const auto &item : result) outputs[item.key().toStringRef()] = item.value().toTensor();
    return outputs;
  }

  bool has_edge_gradients() const override
  {
    return module.hasattr("potential") && module.attr("potential").isModule() &&
        module.attr("potential").toModule().find_method("energies_and_forces").has_value();
  }

  // mlip.models.potential.Potential.energies_and_forces: (atomic energies, forces, edge vectors,
  // dE/dr per edge or None for a direct head[, a committee's member outputs]).
  Outputs forward_with_edge_gradients(const torch::Tensor &positions, const torch::Tensor &atom_types,
                                      const torch::Tensor &edge_index, const torch::Tensor &edge_shifts,
                                      int64_t num_local) override
  {
    // create_graph false; paired false: LAMMPS' full lists are not ordered in pairs.
    std::vector<torch::jit::IValue> inputs{positions, atom_types, edge_index, edge_shifts, num_local, false, false};
    torch::jit::GraphOptimizerEnabledGuard no_executor_optimizations(false);
    torch::jit::Module potential = module.attr("potential").toModule();
    const auto out = potential.get_method("energies_and_forces")(inputs).toTuple()->elements();
    if (out.size() < 4 || out[3].isNone()) throw std::runtime_error("the model has no per-edge gradients (direct force head)");
    Outputs outputs;
    const torch::Tensor vectors = out[2].toTensor().detach(), gradients = out[3].toTensor().detach();
    outputs["atomic_energies"] = out[0].toTensor().detach();
    outputs["energy"] = outputs["atomic_energies"].sum();
    outputs["forces"] = out[1].toTensor().detach();
    outputs["virial"] = -vectors.t().matmul(gradients);
    outputs["edge_vectors"] = vectors;
    outputs["edge_gradients"] = gradients;
    if (out.size() > 4)    // a committee's member outputs (files written before 2026-12 lack them)
      for (const auto &item : out[4].toGenericDict()) outputs[item.key().toStringRef()] = item.value().toTensor();
    return outputs;
  }

 private:
  torch::jit::Module module;
};

// mlip/deploy/aoti.py: inputs as the contract's, num_local a 0-d int64 tensor; outputs a list
// in the order of metadata["aoti_outputs"].
class AOTIModel : public DeployedModel {
 public:
  AOTIModel(const std::string &path, const torch::Device &device, const std::string &metadata_text)
  {
    const auto metadata = LAMMPS_NS::json::parse(metadata_text);
    const std::string built_with = metadata.at("torch_version").get<std::string>();
    const std::string running = TORCH_VERSION;
    if (built_with != running.substr(0, running.find('+')))
      throw std::runtime_error("AOTInductor package built with torch " + built_with + ", this plugin runs torch " +
                               running + ": compiled packages only run on the torch version that built them; "
                               "deploy it again (`mlip deploy model.pt -o model.pt2`)");
    const std::string compiled_for = metadata.at("device").get<std::string>();
    if (compiled_for != c10::DeviceTypeName(device.type(), true))
      throw std::runtime_error("AOTInductor package compiled for device '" + compiled_for + "', this rank runs on " +
                               device.str() + ": deploy it again for that device (or choose `pair_style mlip device " +
                               compiled_for + "`)");
    output_names = metadata.at("aoti_outputs").get<std::vector<std::string>>();
    loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
        path, "model", false, 1, device.has_index() ? device.index() : (c10::DeviceIndex) -1);
  }

  Outputs forward(const torch::Tensor &positions, const torch::Tensor &atom_types,
                  const torch::Tensor &edge_index, const torch::Tensor &edge_shifts,
                  int64_t num_local) override
  {
    const auto int64 = torch::TensorOptions().dtype(torch::kInt64).device(positions.device());
    std::vector<torch::Tensor> inputs{positions, atom_types, edge_index, edge_shifts, torch::tensor(num_local, int64)};
    const auto result = loader->run(inputs);
    if (result.size() != output_names.size())
      throw std::runtime_error("AOTInductor package returned " + std::to_string(result.size()) +
                               " outputs, its metadata names " + std::to_string(output_names.size()));
    Outputs outputs;
    for (size_t k = 0; k < result.size(); k++) outputs[output_names[k]] = result[k];
    return outputs;
  }

 private:
  std::vector<std::string> output_names;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
};

}    // namespace

std::unique_ptr<DeployedModel> load_deployed_model(const std::string &path, const torch::Device &device,
                                                   std::string &metadata)
{
  bool aoti = false;
  try {
    caffe2::serialize::PyTorchStreamReader archive(path);
    for (const auto &name : archive.getAllRecords())
      if (name.rfind(AOTI_RECORDS, 0) == 0) aoti = true;
    metadata.clear();
    if (archive.hasRecord(METADATA_RECORD)) {
      const auto record = archive.getRecord(METADATA_RECORD);
      metadata.assign(static_cast<const char *>(std::get<0>(record).get()), std::get<1>(record));
    }
  } catch (const std::exception &e) {
    throw std::runtime_error("not a readable zip archive (corrupt or truncated?): " + first_line(e.what()));
  }
  try {
    if (aoti) return std::make_unique<AOTIModel>(path, device, metadata);
    return std::make_unique<TorchScriptModel>(path, device);
  } catch (const std::runtime_error &e) {
    throw std::runtime_error(first_line(e.what()));
  } catch (const std::exception &e) {
    throw std::runtime_error(std::string(aoti ? "AOTInductor package" : "TorchScript archive") +
                             " could not be loaded: " + first_line(e.what()));
  }
}

}    // namespace mlip
