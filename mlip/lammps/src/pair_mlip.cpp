/* pair_style mlip: see pair_mlip.h and lammps_plugin/README.md. */

#include "pair_mlip.h"

#include "atom.h"
#include "comm.h"
#include "domain.h"
#include "error.h"
#include "force.h"
#include "json.h"
#include "memory.h"
#include "neigh_list.h"
#include "neighbor.h"
#include "update.h"
#include "utils.h"

#include <ATen/Parallel.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/cuda.h>
#include <torch/version.h>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <numeric>
#include <string>
#include <unordered_map>

using namespace LAMMPS_NS;

namespace {

// Constants of the deployed model file format (mlip/deploy/model_file.py).
const char *const METADATA_FILE = "mlip/metadata.json";
const char *const FORMAT_NAME = "mlip-torchscript";
const char *const AOTI_FORMAT_NAME = "mlip-aoti";    // AOTInductor package (mlip/deploy/aoti.py)
const int FORMAT_VERSION = 1;
// Atoms closer than this (Å) are refused as overlapping (broken input or wrong units), the
// default of mlip's ASE calculator (mlip.data.atoms.DEFAULT_MIN_DISTANCE); `pair_style mlip
// min_distance D` changes it, 0 turns the check off.
const double DEFAULT_MIN_DISTANCE = 0.3;
// 1 eV in kcal/mol (`units real`): e N_A / 4184 J, exact in the 2019 SI (CODATA 2018).
const double EV_IN_KCAL_PER_MOL = 1.602176634e-19 * 6.02214076e23 / 4184.0;

// torch error messages carry a long C++ backtrace: the first line is what users need.
std::string first_line(const std::string &text)
{
  const auto end = text.find('\n');
  return end == std::string::npos ? text : text.substr(0, end);
}

// Large tensors from glibc's heap instead of fresh mmap'd pages every step (page faults and
// zero-filling of hundreds of MB per step for thousands of atoms); the same settings as
// mlip/allocator.py, and MLIP_REUSE_MEMORY=0 turns them off there and here.
void reuse_freed_memory()
{
#if defined(__GLIBC__)
  const char *env = std::getenv("MLIP_REUSE_MEMORY");
  if (env && std::string(env) == "0") return;
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, std::numeric_limits<int>::max());
#endif
}

// --- Integrity of the model file ------------------------------------------------------------
// torch::jit::load does not check the CRC-32 that a zip archive stores for each member: a model
// file with a flipped bit in its weights would load and give wrong forces. The checks below read
// the archive's central directory and recompute each member's CRC-32 (what Python's
// zipfile.testzip does in mlip.deploy.read_metadata), so every file mlip ever wrote is checked.

// Little-endian unsigned integer of `width` bytes at `at`; 0 past the end (the signature checks
// below then fail).
uint64_t read_le(const std::string &bytes, uint64_t at, int width)
{
  if (at + width > bytes.size()) return 0;
  uint64_t value = 0;
  for (int k = width - 1; k >= 0; k--) value = (value << 8) | (unsigned char) bytes[at + k];
  return value;
}

// The zip format's CRC-32 (reflected polynomial 0xEDB88320), one table lookup per byte.
uint32_t crc32(const char *data, uint64_t size)
{
  static const std::vector<uint32_t> table = [] {
    std::vector<uint32_t> t(256);
    for (uint32_t n = 0; n < 256; n++) {
      uint32_t c = n;
      for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[n] = c;
    }
    return t;
  }();
  uint32_t c = 0xFFFFFFFFu;
  for (uint64_t i = 0; i < size; i++) c = table[(c ^ (unsigned char) data[i]) & 0xFFu] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

// What is damaged in the zip archive `bytes`, or "" if every member matches its stored CRC-32.
std::string zip_damage(const std::string &bytes)
{
  const uint64_t size = bytes.size();
  // The end-of-central-directory record (22 bytes + a comment of at most 65535) ends the file.
  uint64_t end = size;
  for (uint64_t back = 22; back <= size && back <= 22 + 65535; back++)
    if (read_le(bytes, size - back, 4) == 0x06054b50) {
      end = size - back;
      break;
    }
  if (end == size) return "no zip end-of-central-directory record (not a zip archive, or truncated)";
  uint64_t entries = read_le(bytes, end + 10, 2);
  uint64_t directory = read_le(bytes, end + 16, 4);
  if (entries == 0xFFFF || directory == 0xFFFFFFFF) {    // zip64: a locator precedes the record
    const uint64_t record = end >= 20 && read_le(bytes, end - 20, 4) == 0x07064b50 ? read_le(bytes, end - 12, 8) : 0;
    if (read_le(bytes, record, 4) != 0x06064b50) return "zip64 end-of-central-directory record missing";
    entries = read_le(bytes, record + 32, 8);
    directory = read_le(bytes, record + 48, 8);
  }
  uint64_t at = directory;
  for (uint64_t e = 0; e < entries; e++) {
    if (read_le(bytes, at, 4) != 0x02014b50) return "central directory damaged";
    const uint64_t method = read_le(bytes, at + 10, 2);
    const uint64_t crc = read_le(bytes, at + 16, 4);
    uint64_t stored = read_le(bytes, at + 20, 4);
    uint64_t original = read_le(bytes, at + 24, 4);
    const uint64_t name_length = read_le(bytes, at + 28, 2);
    const uint64_t extra_end = at + 46 + name_length + read_le(bytes, at + 30, 2);
    uint64_t local = read_le(bytes, at + 42, 4);
    const std::string name = bytes.substr(std::min(at + 46, size), name_length);
    // zip64 extra field (id 1): 8-byte values for the saturated fields, in this order.
    for (uint64_t x = at + 46 + name_length; x + 4 <= extra_end; x += 4 + read_le(bytes, x + 2, 2)) {
      if (read_le(bytes, x, 2) != 1) continue;
      uint64_t field = x + 4;
      if (original == 0xFFFFFFFF) {
        original = read_le(bytes, field, 8);
        field += 8;
      }
      if (stored == 0xFFFFFFFF) {
        stored = read_le(bytes, field, 8);
        field += 8;
      }
      if (local == 0xFFFFFFFF) local = read_le(bytes, field, 8);
    }
    at = extra_end + read_le(bytes, at + 32, 2);
    if (read_le(bytes, local, 4) != 0x04034b50) return "member '" + name + "': local header damaged";
    const uint64_t data = local + 30 + read_le(bytes, local + 26, 2) + read_le(bytes, local + 28, 2);
    if (data + stored > size) return "member '" + name + "' is truncated";
    // torch stores members uncompressed; a compressed one (not written by torch) is left to torch.
    if (method == 0 && crc32(bytes.data() + data, stored) != crc)
      return "member '" + name + "' fails its CRC-32 check";
  }
  return "";
}

// Per-atom virials from the per-edge gradients g_ij = dE/dr_ij (r_ij = x_j - x_i). Each edge's
// W_ij = -r_ij (x) g_ij (their sum is the global virial, sum_i x_i (x) F_i) is counted for its
// center i and for its neighbor j: returns (nnodes, 18), per node [C | N], 3x3 row-major each,
// C = sum of W over the edges it is the center of, N = over the edges it is the neighbor of.
// compute stress/atom gets (C + N) / 2 (the pairwise split), centroid/stress/atom gets N: for a
// strictly local model (E_i depends only on the edges centered at i, as in Allegro) g_ij is
// dE_i/dr_ij and N is exactly the per-atom virial of the heat flux
// J = sum_i e_i v_i + sum_i W_i v_i, W_j = -sum_i r_ij (x) dE_i/dr_ij (Fan et al., Phys. Rev. B
// 92, 094301 (2015)); the pairwise split is not, for many-body models. Message passing mixes
// several atoms' energies into each g_ij: there N is an approximation (warning in compute()).
torch::Tensor edge_virial_shares(const torch::Tensor &vectors, const torch::Tensor &gradients,
                                 const torch::Tensor &edge_index, int64_t nnodes)
{
  const torch::Tensor edge_virials = (-vectors.unsqueeze(2) * gradients.unsqueeze(1)).reshape({-1, 9});
  const torch::Tensor zeros = torch::zeros({nnodes, 9}, edge_virials.options());
  return torch::cat({zeros.index_add(0, edge_index[0], edge_virials), zeros.index_add(0, edge_index[1], edge_virials)}, 1);
}

// Standard atomic weights (u) of H..Og, as ase.data.atomic_masses (IUPAC 2016). LAMMPS types
// carry a mass but no element: the mass is the one hint of what a type holds.
struct ElementMass {
  const char *symbol;
  double mass;
};
const ElementMass ELEMENT_MASSES[] = {
    {"H", 1.008}, {"He", 4.0026}, {"Li", 6.94}, {"Be", 9.01218}, {"B", 10.81}, {"C", 12.011},
    {"N", 14.007}, {"O", 15.999}, {"F", 18.9984}, {"Ne", 20.1797}, {"Na", 22.9898}, {"Mg", 24.305},
    {"Al", 26.9815}, {"Si", 28.085}, {"P", 30.9738}, {"S", 32.06}, {"Cl", 35.45}, {"Ar", 39.948},
    {"K", 39.0983}, {"Ca", 40.078}, {"Sc", 44.9559}, {"Ti", 47.867}, {"V", 50.9415},
    {"Cr", 51.9961}, {"Mn", 54.938}, {"Fe", 55.845}, {"Co", 58.9332}, {"Ni", 58.6934},
    {"Cu", 63.546}, {"Zn", 65.38}, {"Ga", 69.723}, {"Ge", 72.63}, {"As", 74.9216}, {"Se", 78.971},
    {"Br", 79.904}, {"Kr", 83.798}, {"Rb", 85.4678}, {"Sr", 87.62}, {"Y", 88.9058}, {"Zr", 91.224},
    {"Nb", 92.9064}, {"Mo", 95.95}, {"Tc", 97.9072}, {"Ru", 101.07}, {"Rh", 102.906},
    {"Pd", 106.42}, {"Ag", 107.868}, {"Cd", 112.414}, {"In", 114.818}, {"Sn", 118.71},
    {"Sb", 121.76}, {"Te", 127.6}, {"I", 126.904}, {"Xe", 131.293}, {"Cs", 132.905},
    {"Ba", 137.327}, {"La", 138.905}, {"Ce", 140.116}, {"Pr", 140.908}, {"Nd", 144.242},
    {"Pm", 144.913}, {"Sm", 150.36}, {"Eu", 151.964}, {"Gd", 157.25}, {"Tb", 158.925},
    {"Dy", 162.5}, {"Ho", 164.93}, {"Er", 167.259}, {"Tm", 168.934}, {"Yb", 173.054},
    {"Lu", 174.967}, {"Hf", 178.49}, {"Ta", 180.948}, {"W", 183.84}, {"Re", 186.207},
    {"Os", 190.23}, {"Ir", 192.217}, {"Pt", 195.084}, {"Au", 196.967}, {"Hg", 200.592},
    {"Tl", 204.38}, {"Pb", 207.2}, {"Bi", 208.98}, {"Po", 208.982}, {"At", 209.987},
    {"Rn", 222.018}, {"Fr", 223.02}, {"Ra", 226.025}, {"Ac", 227.028}, {"Th", 232.038},
    {"Pa", 231.036}, {"U", 238.029}, {"Np", 237.048}, {"Pu", 244.064}, {"Am", 243.061},
    {"Cm", 247.07}, {"Bk", 247.07}, {"Cf", 251.08}, {"Es", 252.083}, {"Fm", 257.095},
    {"Md", 258.098}, {"No", 259.101}, {"Lr", 262.11}, {"Rf", 267.122}, {"Db", 268.126},
    {"Sg", 271.134}, {"Bh", 270.133}, {"Hs", 269.134}, {"Mt", 278.156}, {"Ds", 281.165},
    {"Rg", 281.166}, {"Cn", 285.177}, {"Nh", 286.182}, {"Fl", 289.19}, {"Mc", 289.194},
    {"Lv", 293.204}, {"Ts", 293.208}, {"Og", 294.214},
};
// Tables and input files give an element's mass to within ~0.01 u (Si: 28.085 or 28.0855); the
// closest distinct elements below Po differ by 0.13 u (Ar 39.948, Ca 40.078). Isotopes (D 2.014)
// and scaled masses match no element.
const double MASS_TOLERANCE = 0.05;

// The standard mass of an element symbol; NaN for a name that is none.
double standard_mass(const std::string &symbol)
{
  for (const auto &element : ELEMENT_MASSES)
    if (symbol == element.symbol) return element.mass;
  return std::numeric_limits<double>::quiet_NaN();
}

// The element whose standard mass is closest to `mass`, if within MASS_TOLERANCE; else "".
std::string element_of_mass(double mass)
{
  std::string closest;
  double best = MASS_TOLERANCE;
  for (const auto &element : ELEMENT_MASSES)
    if (std::abs(element.mass - mass) <= best) {
      best = std::abs(element.mass - mass);
      closest = element.symbol;
    }
  return closest;
}

std::string join(const std::vector<std::string> &words)
{
  std::string out;
  for (const auto &word : words) out += (out.empty() ? "" : " ") + word;
  return out;
}

// "cpu", "cuda", "cuda:N" or "auto".
bool valid_device(const std::string &name)
{
  if (name == "cpu" || name == "cuda" || name == "auto") return true;
  return name.size() > 5 && name.compare(0, 5, "cuda:") == 0 &&
      name.find_first_not_of("0123456789", 5) == std::string::npos;
}

// This rank's index among the ranks on its node: MPI's shared-memory split of all ranks (MPI-3),
// else the launcher's variable. GPUs are handed out by it, so ranks on one node spread over them.
int node_local_rank()
{
#if defined(MPI_COMM_TYPE_SHARED)
  MPI_Comm node;
  if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) == MPI_SUCCESS) {
    int rank = 0;
    MPI_Comm_rank(node, &rank);
    MPI_Comm_free(&node);
    return rank;
  }
#endif
  for (const char *name : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK",
                           "SLURM_LOCALID", "PMI_LOCAL_RANK"})
    if (const char *value = std::getenv(name)) return std::atoi(value);
  return 0;
}

}    // namespace

/* ---------------------------------------------------------------------- */

PairMLIP::PairMLIP(LAMMPS *lmp) : Pair(lmp)
{
  single_enable = 0;
  restartinfo = 0;
  one_coeff = 1;
  manybody_flag = 1;
  // The virial comes from the model (sum over edges, not f.r over atoms). Per-atom virials
  // (compute stress/atom, centroid/stress/atom) come from the per-edge gradients: see
  // edge_virial_shares().
  no_virial_fdotr_compute = 1;
  centroidstressflag = CENTROID_AVAIL;

  // Several torch threads per MPI rank were measured slower than one (NOTES.md section 2):
  // one per rank by default, MLIP_TORCH_THREADS to change it.
  int threads = 1;
  if (const char *env = std::getenv("MLIP_TORCH_THREADS")) {
    threads = std::atoi(env);
    if (threads < 1)
      error->all(FLERR, "pair_style mlip: MLIP_TORCH_THREADS must be a positive integer, got '{}'",
                 env);
  }
  at::set_num_threads(threads);
  reuse_freed_memory();
}

PairMLIP::~PairMLIP()
{
  if (allocated) {
    memory->destroy(setflag);
    memory->destroy(cutsq);
  }
  memory->destroy(member_forces);
  memory->destroy(force_uncertainty);
  delete[] pvector;
}

void PairMLIP::allocate()
{
  allocated = 1;
  const int n = atom->ntypes;
  memory->create(setflag, n + 1, n + 1, "pair:setflag");
  for (int i = 1; i <= n; i++)
    for (int j = i; j <= n; j++) setflag[i][j] = 0;
  memory->create(cutsq, n + 1, n + 1, "pair:cutsq");
  type_map.assign(n + 1, -1);
}

/* ---------------------------------------------------------------------- */

// `pair_style mlip [keyword value] ...`; the model comes with pair_coeff.
void PairMLIP::settings(int narg, char **arg)
{
  min_distance = DEFAULT_MIN_DISTANCE;
  device_request = "auto";
  for (int iarg = 0; iarg < narg; iarg += 2) {
    const std::string keyword = arg[iarg];
    if (keyword != "min_distance" && keyword != "device")
      error->all(FLERR,
                 "pair_style mlip: unknown keyword '{}' (keywords: min_distance, device); the model "
                 "is given in `pair_coeff * * model.pt <element per atom type>`",
                 keyword);
    if (keyword == "device") {
      if (iarg + 1 >= narg || !valid_device(arg[iarg + 1]))
        error->all(FLERR, "pair_style mlip: device must be cpu, cuda, cuda:N or auto; got '{}'",
                   iarg + 1 < narg ? arg[iarg + 1] : "");
      device_request = arg[iarg + 1];
      continue;
    }
    if (iarg + 1 >= narg) error->all(FLERR, "pair_style mlip: keyword {} needs a value", keyword);
    min_distance = utils::numeric(FLERR, arg[iarg + 1], false, lmp);
    if (!(min_distance >= 0.0) || !std::isfinite(min_distance))
      error->all(FLERR, "pair_style mlip: min_distance must be >= 0 Å, got {}", arg[iarg + 1]);
  }
}

void PairMLIP::coeff(int narg, char **arg)
{
  const int ntypes = atom->ntypes;
  if (narg < 3 || strcmp(arg[0], "*") != 0 || strcmp(arg[1], "*") != 0)
    error->all(FLERR,
               "pair_coeff for pair_style mlip must be `pair_coeff * * model.pt <element per "
               "atom type>`");
  if (!allocated) allocate();

  load_model(arg[2]);

  std::vector<std::string> elements(arg + 3, arg + narg);
  if ((int) elements.size() != ntypes)
    error->all(FLERR,
               "pair_coeff * * {} needs one element name per atom type: got {} ({}) for {} atom "
               "type(s); the model knows {}",
               model_path, elements.size(), join(elements), ntypes, join(type_names));

  // NULL leaves a type to the other pair styles of hybrid/overlay: its atoms are neither centers
  // nor neighbours of the model's edges (the model sees only its own species).
  const bool sub_style = force->pair != this;    // under hybrid, force->pair is the hybrid style
  for (int itype = 1; itype <= ntypes; itype++) {
    const std::string &element = elements[itype - 1];
    if (element == "NULL") {
      if (!sub_style)
        error->all(FLERR,
                   "pair_coeff: atom type {} is NULL, but NULL only leaves a type to another pair "
                   "style: use `pair_style hybrid/overlay mlip ... <other style>` (then `pair_coeff * * "
                   "mlip {} ...`), or name an element of the model ({})",
                   itype, model_path, join(type_names));
      if (direct_forces)
        error->all(FLERR,
                   "pair_coeff: NULL atom types need a gradient-head model: {} predicts forces "
                   "directly, and its net force cannot be removed from the model's atoms alone",
                   model_path);
      type_map[itype] = -1;
      continue;
    }
    int index = -1;
    for (int t = 0; t < (int) type_names.size(); t++)
      if (type_names[t] == element) index = t;
    if (index < 0)
      error->all(FLERR,
                 "pair_coeff: element '{}' (atom type {}) is not known to model {}; it knows: {} "
                 "(NULL leaves a type to another style of pair_style hybrid/overlay)",
                 element, itype, model_path, join(type_names));
    type_map[itype] = index;
  }
  checked_type_masses = false;
  for (int i = 1; i <= ntypes; i++)
    for (int j = i; j <= ntypes; j++) setflag[i][j] = type_map[i] >= 0 && type_map[j] >= 0;
}

// A type named X in pair_coeff whose mass is another element's standard mass (types given in the
// wrong order), or a NULL type whose mass is that of one of the model's elements (atoms the model
// perhaps should describe), is most likely a mistake. Warnings, not errors: another style may
// describe some of the model's elements on purpose (a substrate layer, one region of a
// multi-scale run), as in LAMMPS' own many-body styles, which do not check at all. Run at the
// first init after pair_coeff, when the `mass` commands have been read.
void PairMLIP::warn_about_type_masses()
{
  checked_type_masses = true;
  if (comm->me != 0 || atom->mass == nullptr) return;    // per-atom masses (rmass): no type masses
  for (int itype = 1; itype <= atom->ntypes; itype++) {
    if (!atom->mass_setflag[itype]) continue;
    const double mass = atom->mass[itype];
    const std::string like = element_of_mass(mass);
    if (like.empty()) continue;
    if (type_map[itype] < 0) {
      if (std::find(type_names.begin(), type_names.end(), like) != type_names.end())
        error->warning(FLERR,
                       "pair_coeff: atom type {} is NULL (left to other pair styles) but its mass {:g} is "
                       "that of {}, an element of model {}: if type {} holds {} atoms for the model, "
                       "name {} in its place; if another style describes them on purpose, ignore this",
                       itype, mass, like, model_path, itype, like, like);
    } else if (!(std::abs(mass - standard_mass(type_names[type_map[itype]])) <= MASS_TOLERANCE)) {
      // (not "like != name": Bi and Po, 0.002 u apart, are each other's closest)
      error->warning(FLERR,
                     "pair_coeff: atom type {} is {} but its mass {:g} is that of {}: are the element "
                     "names of pair_coeff * * {} in the order of the atom types?",
                     itype, type_names[type_map[itype]], mass, like, model_path);
    }
  }
}

// The device of this rank: `pair_style mlip device ...`, or MLIP_DEVICE if set. `cuda` (and `auto`
// where torch sees a GPU) gives cuda:(node-local rank % GPUs visible to this rank). Collective.
void PairMLIP::choose_device()
{
  std::string request = device_request;
  const char *env = std::getenv("MLIP_DEVICE");
  if (env && *env) request = env;
  const std::string asked = (env && *env ? "MLIP_DEVICE=" : "device ") + request;    // for messages
  if (!valid_device(request))
    error->all(FLERR, "pair_style mlip: {}: must be cpu, cuda, cuda:N or auto", asked);

  // A CUDA build of torch registers its device guard when libc10_cuda loads (the plugin links it
  // whenever it exists: mlip/lammps/build.py); a CPU-only torch has none.
  const bool torch_has_cuda = c10::impl::hasDeviceGuardImpl(c10::DeviceType::CUDA);
  const int gpus = torch_has_cuda ? (int) torch::cuda::device_count() : 0;
  const int local_rank = node_local_rank();
  std::string why;    // how `auto` decided, for the log
  if (request == "auto") {
    why = torch_has_cuda ? fmt::format(" (torch sees {} GPU(s))", gpus)
                         : fmt::format(" (torch {} is a CPU-only build)", TORCH_VERSION);
    request = gpus > 0 ? "cuda" : "cpu";
  }
  if (request == "cpu") {
    device = torch::kCPU;
  } else {
    if (!torch_has_cuda)
      error->all(FLERR,
                 "pair_style mlip: {} needs a CUDA build of torch, but the plugin runs with torch "
                 "{}, a CPU-only build: install a CUDA torch and run `mlip build-lammps-plugin`, or "
                 "use `device cpu`",
                 asked, TORCH_VERSION);
    const char *visible = std::getenv("CUDA_VISIBLE_DEVICES");
    if (gpus == 0)
      error->one(FLERR,
                 "pair_style mlip: {}: rank {} (node-local rank {}) finds no GPU (torch sees 0 "
                 "CUDA devices; CUDA_VISIBLE_DEVICES='{}')",
                 asked, comm->me, local_rank, visible ? visible : "(unset)");
    const int index = request == "cuda" ? local_rank % gpus : std::atoi(request.c_str() + 5);
    if (index >= gpus)
      error->one(FLERR, "pair_style mlip: {}: rank {} sees only {} GPU(s)", asked, comm->me, gpus);
    device = torch::Device(torch::kCUDA, (c10::DeviceIndex) index);
  }

  // One log line with every rank's device (-1: cpu).
  const int mine[2] = {local_rank, device.is_cuda() ? (int) device.index() : -1};
  std::vector<int> all(2 * comm->nprocs);
  MPI_Gather(mine, 2, MPI_INT, all.data(), 2, MPI_INT, 0, world);
  if (comm->me == 0) {
    std::string ranks;
    for (int r = 0; r < comm->nprocs; r++)
      ranks += fmt::format("{}rank {} (node-local {}) on {}", r ? ", " : "", r, all[2 * r],
                           all[2 * r + 1] < 0 ? std::string("cpu") : fmt::format("cuda:{}", all[2 * r + 1]));
    utils::logmesg(lmp, "pair_style mlip: {}{}: {}\n", asked, why, ranks);
  }
}

// Loads the model file (TorchScript archive or AOTInductor package, mlip_model.h) for this rank's
// device and checks the metadata fields this pair style relies on. Every rank reads the file, so
// every rank reaches the same error->all().
void PairMLIP::load_model(const std::string &path)
{
  model_path = path;
  if (!std::ifstream(path).good())
    error->all(FLERR, "pair_style mlip: model file {} does not exist or is not readable", path);
  choose_device();

  {
    std::ifstream file(path, std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    const std::string damage = zip_damage(bytes);
    if (!damage.empty())
      error->all(FLERR,
                 "pair_style mlip: {} is not a readable mlip model file (corrupt, truncated, or not "
                 "an archive written by `mlip deploy`): {}",
                 path, damage);
  }

  std::string text;    // the metadata JSON
  try {
    model = mlip::load_deployed_model(path, device, text);
  } catch (const std::exception &e) {
    error->all(FLERR,
               "pair_style mlip: {} is not a readable mlip model file (corrupt, truncated, or not "
               "a model file written by `mlip deploy`): {}",
               path, e.what());
  }
  has_edge_gradients = model->has_edge_gradients();
  if (text.empty())
    error->all(FLERR,
               "pair_style mlip: {} is a TorchScript/zip file but not an mlip model (no {} inside); "
               "write it with `mlip deploy`",
               path, METADATA_FILE);

  std::string units_energy, units_length, force_head, dtype_name;
  std::string task = "potential", property_name, property_unit;
  try {
    const json metadata = json::parse(text);
    const std::string format = metadata.at("format").get<std::string>();
    if (format != FORMAT_NAME && format != AOTI_FORMAT_NAME)
      error->all(FLERR, "pair_style mlip: {} is not an mlip model file (format '{}')", path,
                 metadata.at("format").dump());
    const int version = metadata.at("format_version").get<int>();
    if (version != FORMAT_VERSION)
      error->all(FLERR,
                 "pair_style mlip: {} has model file format version {}, this pair style reads "
                 "version {}: re-deploy the model with a matching mlip (`mlip deploy`) or rebuild "
                 "the plugin (`mlip build-lammps-plugin`)",
                 path, version, FORMAT_VERSION);
    // Files written before property models have no "task": they are potentials.
    if (metadata.contains("task")) task = metadata.at("task").get<std::string>();
    if (task == "property") {
      property_name = metadata.at("property").value("name", "");
      property_unit = metadata.at("property").value("unit", "");
    }
    type_names = metadata.at("type_names").get<std::vector<std::string>>();
    r_max = metadata.at("r_max").get<double>();
    message_passing_layers = metadata.at("message_passing_layers").get<int>();
    force_head = metadata.at("force_head").get<std::string>();
    dtype_name = metadata.at("dtype").get<std::string>();
    units_energy = metadata.at("units").at("energy").get<std::string>();
    units_length = metadata.at("units").at("length").get<std::string>();
    const json &hyperparameters = metadata.at("hyperparameters");
    num_members = hyperparameters.contains("members") ? (int) hyperparameters.at("members").size() : 0;
  } catch (const std::exception &e) {
    error->all(FLERR, "pair_style mlip: metadata of {} is invalid or incomplete: {}", path,
               first_line(e.what()));
  }

  if (task == "property")
    error->all(FLERR,
               "pair_style mlip: {} is a property model (it predicts '{}'{} per structure): it has no "
               "energy, forces or stress; use `mlip predict`",
               path, property_name, property_unit.empty() ? "" : " in " + property_unit);
  if (task != "potential")
    error->all(FLERR, "pair_style mlip: {} has unknown task '{}' in its metadata", path, task);
  if (!(r_max > 0.0) || message_passing_layers < 1 || type_names.empty())
    error->all(FLERR,
               "pair_style mlip: {} has invalid metadata (r_max {}, message_passing_layers {}, "
               "{} type names)",
               path, r_max, message_passing_layers, type_names.size());
  if (force_head != "gradient" && force_head != "direct")
    error->all(FLERR, "pair_style mlip: {} has unknown force_head '{}'", path, force_head);
  direct_forces = (force_head == "direct");
  if (dtype_name == "float64")
    dtype = torch::kFloat64;
  else if (dtype_name == "float32")
    dtype = torch::kFloat32;
  else
    error->all(FLERR, "pair_style mlip: {} has unknown dtype '{}'", path, dtype_name);
  // LAMMPS `units metal` is eV and Å; a model in other units would be silently wrong.
  if (units_energy != "eV" || (units_length != "Å" && units_length != "A" && units_length != "Angstrom"))
    error->all(FLERR, "pair_style mlip: {} is in units energy '{}', length '{}'; only eV and Å are supported",
               path, units_energy, units_length);

  // A committee's spread: three global values for `compute pair mlip` and per-atom force
  // spreads for `fix pair`; member forces on ghosts go back to their owners like forces.
  // (A second pair_coeff may load a committee of another size: start afresh.)
  delete[] pvector;
  pvector = nullptr;
  nextra = 0;
  comm_reverse = 0;
  memory->destroy(member_forces);
  memory->destroy(force_uncertainty);
  nmax_members = 0;
  warned_no_member_forces = false;
  warned_centroid_message_passing = false;
  if (num_members > 0) {
    nextra = 3;
    pvector = new double[nextra]();
    comm_reverse = 3 * num_members;
  }

  if (comm->me == 0) {
    utils::logmesg(lmp,
                   "pair_style mlip: loaded {}: {} types ({}), r_max {} Å, {} message-passing "
                   "layer(s), {} forces, {}, {} torch thread(s) per rank\n",
                   path, type_names.size(), join(type_names), r_max, message_passing_layers,
                   force_head, dtype_name, at::get_num_threads());
    if (num_members > 0)
      utils::logmesg(lmp,
                     "pair_style mlip: committee of {} models: `compute ID all pair mlip` gives "
                     "c_ID[1] energy spread (eV), c_ID[2] largest and c_ID[3] mean per-atom force "
                     "spread (eV/Å); `fix ID all pair N mlip force_uncertainty 0` the per-atom "
                     "force spread\n",
                     num_members);
  }
}

/* ---------------------------------------------------------------------- */

void PairMLIP::init_style()
{
  // The model speaks eV and Å. Both supported unit styles measure lengths in Å, so positions,
  // r_max and min_distance pass unchanged; energies, forces and virials are scaled on the way out.
  if (strcmp(update->unit_style, "metal") == 0)
    energy_unit = 1.0;
  else if (strcmp(update->unit_style, "real") == 0)
    energy_unit = EV_IN_KCAL_PER_MOL;
  else
    error->all(FLERR,
               "pair_style mlip supports `units metal` (eV, Å: the model's units) and `units real` "
               "(kcal/mol, Å: converted); got `units {}`",
               update->unit_style);
  if (force->newton_pair == 0)
    error->all(FLERR,
               "pair_style mlip requires `newton on` (newton pair on): it computes forces on ghost "
               "atoms that LAMMPS must send back to their owners");
  if (!checked_type_masses) warn_about_type_masses();

  // The overlap policy of mlip's ASE calculator (mlip.data.atoms.check_structure), checked before
  // LAMMPS builds ghosts and neighbor lists, which for a box of a fraction of an Å would hold
  // millions of images: a box edge (a lattice vector) shorter than min_distance puts every atom
  // on its own image; more atoms per volume than spheres min_distance apart can pack
  // (sqrt(2) / d^3, the densest packing) forces an overlap. Closer pairs in other boxes are
  // found in compute() from the edge lengths.
  if (min_distance > 0.0 && domain->xperiodic && domain->yperiodic && domain->zperiodic) {
    const double edges[3] = {domain->xprd, std::sqrt(domain->xy * domain->xy + domain->yprd * domain->yprd),
                             std::sqrt(domain->xz * domain->xz + domain->yz * domain->yz + domain->zprd * domain->zprd)};
    const double shortest = std::min({edges[0], edges[1], edges[2]});
    if (shortest < min_distance)
      error->all(FLERR,
                 "pair_style mlip: the periodic box has an edge only {:.3g} Å long (< min_distance {} Å): "
                 "every atom overlaps its own periodic image (wrong units or box?)",
                 shortest, min_distance);
    const double volume = domain->xprd * domain->yprd * domain->zprd;
    const double density = (double) atom->natoms / volume;
    if (density > std::sqrt(2.0) / (min_distance * min_distance * min_distance))
      error->all(FLERR,
                 "pair_style mlip: {} atoms in a box of {:.3g} Å^3 ({:.3g} atoms/Å^3): denser than "
                 "spheres min_distance {} Å apart can pack, so atoms overlap (wrong units or box?)",
                 atom->natoms, volume, density, min_distance);
  }

  if (direct_forces && comm->me == 0)
    error->warning(FLERR,
                   "pair_style mlip: model {} predicts forces directly (force_head 'direct') and has "
                   "no virial: pressure is reported as NaN; fix npt/nph and box/relax need a "
                   "gradient-head model",
                   model_path);

  if (message_passing_layers == 1) {
    // Strictly local model: edges from owned atoms only.
    neighbor->add_request(this, NeighConst::REQ_FULL);
  } else {
    // Message passing: an owned atom's energy depends on atoms up to layers * r_max away, so
    // ghost atoms within (layers - 1) * r_max need their own complete neighbor lists. Ghosts
    // must therefore reach layers * r_max (+ skin, since atoms move between rebuilds).
    neighbor->add_request(this, NeighConst::REQ_FULL | NeighConst::REQ_GHOST);
    const double needed = message_passing_layers * r_max + neighbor->skin;
    if (comm->mode != 0)
      error->all(FLERR, "pair_style mlip with a message-passing model needs `comm_modify mode single`");
    if (comm->cutghostuser < needed) {
      comm->cutghostuser = needed;
      if (comm->me == 0)
        utils::logmesg(lmp,
                       "pair_style mlip: ghost cutoff set to {} Å ({} layers x r_max {} + skin {})\n",
                       needed, message_passing_layers, r_max, neighbor->skin);
    }
  }
}

double PairMLIP::init_one(int /*i*/, int /*j*/)
{
  return r_max;
}

/* ---------------------------------------------------------------------- */

void PairMLIP::compute(int eflag, int vflag)
{
  ev_init(eflag, vflag);

  // Per-atom virials need dE/dr_ij of every edge (every rank checks the same flags: error->all).
  const bool want_node_virials = vflag_atom || cvflag_atom;
  if (want_node_virials && direct_forces)
    error->all(FLERR,
               "pair_style mlip: model {} predicts forces directly (force_head 'direct'): it has no "
               "virial, so compute stress/atom, centroid/stress/atom and heat/flux are not available",
               model_path);
  if (cvflag_atom && message_passing_layers > 1 && !warned_centroid_message_passing && comm->me == 0)
    error->warning(FLERR,
                   "pair_style mlip: centroid/stress/atom (heat/flux) of message-passing model {} ({} "
                   "layers) is approximate: each edge's dE/dr mixes several atoms' energies; the "
                   "exact heat flux is that of strictly local models (Allegro)",
                   model_path, message_passing_layers);
  if (cvflag_atom) warned_centroid_message_passing = true;
  if (want_node_virials && !has_edge_gradients)
    error->all(FLERR,
               "pair_style mlip: model {} has no compiled potential.energies_and_forces (per-edge "
               "gradients), which compute stress/atom, centroid/stress/atom and heat/flux need: "
               "TorchScript files written by `mlip deploy` have it, AOTInductor packages and "
               "foreign files do not",
               model_path);
  double **x = atom->x;
  double **f = atom->f;
  const int *type = atom->type;
  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  double model_force_sum[3] = {0.0, 0.0, 0.0};    // over owned atoms, for remove_net_force()
  // Committees: each member's forces on all atoms (zeroed here, filled below, ghosts summed
  // back in committee_spread()) and each member's energy of the owned atoms.
  const int M = num_members;
  std::vector<double> member_energy_local(M, 0.0);
  bool have_members = true;
  if (M > 0) {
    grow_member_arrays();
    for (int i = 0; i < nall; i++)
      for (int c = 0; c < 3 * M; c++) member_forces[i][c] = 0.0;
  }

  // Owned atoms of the model's types (the others are NULL in pair_coeff: other styles' business).
  int nowned = 0;
  for (int i = 0; i < nlocal; i++)
    if (type_map[type[i]] >= 0) nowned++;

  // A rank without owned atoms has no energy to compute. It must still join the collective
  // net-force removal of direct models below.
  if (nowned > 0) {
    // The graph: only what the owned atoms' energies depend on. Owned atoms are centers (hop 0);
    // a model with L message-passing layers also needs edges from every atom up to L - 1 hops
    // (edges shorter than r_max) away, and those atoms' neighbors as nodes. LAMMPS' ghost
    // shell (L * r_max + skin) holds more atoms than that. Leaving them out halves the work:
    // 4096 Si atoms, NequIP small (L = 2, r_max 5), one rank: 187k edges instead of 377k,
    // 2.2x less model CPU time (the periodic graph without ghosts has 115k edges).
    // The walk uses LAMMPS' full lists (with ghost lists for L > 1), which include the skin,
    // so each pair is checked against r_max.
    std::vector<int> node_of(nall, -1);    // LAMMPS atom index -> node index, -1: not in the graph
    std::vector<int> atom_of;              // node index -> LAMMPS atom index; owned atoms first
    atom_of.reserve(nall);
    for (int i = 0; i < nlocal; i++)
      if (type_map[type[i]] >= 0) {
        node_of[i] = (int) atom_of.size();
        atom_of.push_back(i);
      }
    std::vector<int64_t> centers, neighbors;
    centers.reserve((int64_t) nlocal * 48 * message_passing_layers);
    neighbors.reserve((int64_t) nlocal * 48 * message_passing_layers);
    const int *numneigh = list->numneigh;
    int **firstneigh = list->firstneigh;
    const double r_max_sq = r_max * r_max;
    const double min_distance_sq = min_distance * min_distance;

    std::vector<int> frontier, next;
    for (int ii = 0; ii < list->inum; ii++)
      if (type_map[type[list->ilist[ii]]] >= 0) frontier.push_back(list->ilist[ii]);
    for (int hop = 0; hop < message_passing_layers; hop++) {
      next.clear();
      for (const int i : frontier) {
        const int *jlist = firstneigh[i];
        for (int jj = 0; jj < numneigh[i]; jj++) {
          const int j = jlist[jj] & NEIGHMASK;
          if (type_map[type[j]] < 0) continue;
          const double dx = x[j][0] - x[i][0];
          const double dy = x[j][1] - x[i][1];
          const double dz = x[j][2] - x[i][2];
          const double rsq = dx * dx + dy * dy + dz * dz;
          if (rsq >= r_max_sq) continue;
          if (rsq < min_distance_sq)
            error->one(FLERR,
                       "pair_style mlip: atoms {} and {} (ids) are {:.3g} Å apart (< min_distance {} "
                       "Å): overlapping atoms or positions in the wrong units? (`pair_style mlip "
                       "min_distance 0` turns this check off)",
                       atom->tag[i], atom->tag[j], std::sqrt(rsq), min_distance);
          if (node_of[j] < 0) {    // a ghost reached for the first time: hop + 1 away
            node_of[j] = (int) atom_of.size();
            atom_of.push_back(j);
            next.push_back(j);
          }
          centers.push_back(node_of[i]);
          neighbors.push_back(node_of[j]);
        }
      }
      frontier.swap(next);
    }
    const int nnodes = (int) atom_of.size();
    const int64_t nedges = (int64_t) centers.size();

    // Positions are taken relative to the first owned atom (the model is translation
    // invariant): float32 models then keep their precision in large boxes.
    torch::Tensor positions = torch::empty({nnodes, 3}, torch::kFloat64);
    torch::Tensor atom_types = torch::empty({nnodes}, torch::kInt64);
    {
      double *pos = positions.data_ptr<double>();
      int64_t *types = atom_types.data_ptr<int64_t>();
      for (int n = 0; n < nnodes; n++) {
        const int i = atom_of[n];
        for (int k = 0; k < 3; k++) pos[3 * n + k] = x[i][k] - x[0][k];
        types[n] = type_map[type[i]];
      }
    }
    torch::Tensor edge_index = torch::empty({2, nedges}, torch::kInt64);
    if (nedges > 0) {
      std::memcpy(edge_index[0].data_ptr<int64_t>(), centers.data(), nedges * sizeof(int64_t));
      std::memcpy(edge_index[1].data_ptr<int64_t>(), neighbors.data(), nedges * sizeof(int64_t));
    }
    // Built on the host, each input moves to the model's device in one copy (none on a CPU).
    // Periodic images are explicit ghost atoms: no shifts, made zero where they are used.
    mlip::Outputs output;
    torch::Tensor node_virials;    // (nnodes, 18) when per-atom virials are asked for
    try {
      const torch::Tensor inputs[4] = {positions.to(device, dtype), atom_types.to(device), edge_index.to(device),
                                       torch::zeros({nedges, 3}, torch::TensorOptions().dtype(dtype).device(device))};
      if (want_node_virials) {
        output = model->forward_with_edge_gradients(inputs[0], inputs[1], inputs[2], inputs[3], (int64_t) nowned);
        node_virials = edge_virial_shares(output.at("edge_vectors"), output.at("edge_gradients"), inputs[2], nnodes);
      } else {
        output = model->forward(inputs[0], inputs[1], inputs[2], inputs[3], (int64_t) nowned);
      }
    } catch (const std::exception &e) {
      error->one(FLERR, "pair_style mlip: model {} failed on {} atoms, {} edges: {}", model_path,
                 nnodes, nedges, first_line(e.what()));
    }

    auto get = [&](const char *key) -> torch::Tensor {
      if (!output.count(key))
        error->one(FLERR, "pair_style mlip: model {} returned no '{}'", model_path, key);
      return output.at(key);
    };

    // Shapes first (no data needed), then everything the host uses leaves the device in one
    // float64 copy: [atomic energies | forces | virial | member forces | member energies].
    const torch::Tensor atomic_energies = get("atomic_energies");
    if (atomic_energies.numel() != nowned)
      error->one(FLERR, "pair_style mlip: model returned {} atomic energies for {} owned atoms",
                 atomic_energies.numel(), nowned);
    // Forces on ghosts too: LAMMPS' reverse communication (newton on) adds them to their owners.
    const torch::Tensor forces = get("forces");
    if (forces.dim() != 2 || forces.size(0) != nnodes || forces.size(1) != 3)
      error->one(FLERR, "pair_style mlip: model returned forces of shape {} for {} atoms",
                 std::string(c10::str(forces.sizes())), nnodes);
    std::vector<torch::Tensor> parts{atomic_energies.reshape(-1), forces.reshape(-1)};
    const bool want_virial = (vflag_global || want_node_virials) && !direct_forces;
    if (want_virial) {
      // Each rank's virial covers the edges of its own graph; LAMMPS sums ranks.
      const torch::Tensor w = get("virial");
      if (w.numel() != 9)
        error->one(FLERR, "pair_style mlip: model returned a virial with {} entries", w.numel());
      parts.push_back(w.reshape(-1));
    }
    if (M > 0) {
      // Committee files deployed before 2026-12 have member energies but no member forces.
      have_members = output.count("member_forces") && output.count("member_atomic_energies");
      if (have_members) {
        const torch::Tensor member_force = get("member_forces");    // (nnodes, 3, M)
        const torch::Tensor member_energy = get("member_atomic_energies");    // (nowned, M)
        if (member_force.numel() != (int64_t) nnodes * 3 * M || member_energy.numel() != (int64_t) nowned * M)
          error->one(FLERR, "pair_style mlip: model {} returned member outputs of shapes {} and {} for "
                     "{} members, {} atoms, {} owned", model_path,
                     std::string(c10::str(member_force.sizes())), std::string(c10::str(member_energy.sizes())),
                     M, nnodes, nowned);
        parts.push_back(member_force.reshape(-1));
        parts.push_back(member_energy.reshape(-1));
      }
    }
    const int64_t node_virials_at = std::accumulate(parts.begin(), parts.end(), (int64_t) 0,
                                                    [](int64_t n, const torch::Tensor &t) { return n + t.numel(); });
    if (want_node_virials) parts.push_back(node_virials.reshape(-1));
    for (auto &part : parts) part = part.to(torch::kFloat64);
    torch::Tensor host = torch::cat(parts).to(torch::kCPU);
    // Every part is an energy, a force or a virial: eV -> the LAMMPS unit style's energy.
    if (energy_unit != 1.0) host.mul_(energy_unit);
    const double *energy = host.data_ptr<double>();            // nowned: the first nodes
    const double *force = energy + nowned;                     // 3 per node
    const int64_t after_forces = nowned + 3 * (int64_t) nnodes;
    const int64_t members_at = after_forces + (want_virial ? 9 : 0);

    if (eflag_global)
      for (int n = 0; n < nowned; n++) eng_vdwl += energy[n];
    if (eflag_atom)
      for (int n = 0; n < nowned; n++) eatom[atom_of[n]] += energy[n];

    for (int n = 0; n < nnodes; n++)
      for (int k = 0; k < 3; k++) f[atom_of[n]][k] += force[3 * n + k];
    for (int n = 0; n < nowned; n++)
      for (int k = 0; k < 3; k++) model_force_sum[k] += force[3 * n + k];

    if (M > 0 && have_members) {
      const double *mf = energy + members_at;                  // 3 M per node
      const double *me = mf + 3 * (int64_t) M * nnodes;        // M per owned atom
      for (int n = 0; n < nnodes; n++)
        for (int c = 0; c < 3 * M; c++) member_forces[atom_of[n]][c] += mf[3 * M * n + c];
      for (int n = 0; n < nowned; n++)
        for (int m = 0; m < M; m++) member_energy_local[m] += me[M * n + m];
    }

    if (want_node_virials) {
      // Node n's shares (edge_virial_shares(): as center C, as neighbor N; 3x3 row-major) go to
      // its LAMMPS atom, ghosts too: compute stress/atom and centroid/stress/atom sum ghosts back
      // to their owners (newton on).
      const double *w = energy + node_virials_at;
      for (int n = 0; n < nnodes; n++) {
        const double *c = w + 18 * n, *v = c + 9;
        const int i = atom_of[n];
        if (vflag_atom) {    // (C + N) / 2, symmetric: xx, yy, zz, xy, xz, yz
          vatom[i][0] += 0.5 * (c[0] + v[0]);
          vatom[i][1] += 0.5 * (c[4] + v[4]);
          vatom[i][2] += 0.5 * (c[8] + v[8]);
          vatom[i][3] += 0.25 * (c[1] + c[3] + v[1] + v[3]);
          vatom[i][4] += 0.25 * (c[2] + c[6] + v[2] + v[6]);
          vatom[i][5] += 0.25 * (c[5] + c[7] + v[5] + v[7]);
        }
        if (cvflag_atom) {    // N, the full tensor: xx, yy, zz, xy, xz, yz, yx, zx, zy
          const int order[9] = {0, 4, 8, 1, 2, 5, 3, 6, 7};
          for (int k = 0; k < 9; k++) cvatom[i][k] += v[order[k]];
        }
      }
    }

    if (want_virial && vflag_global) {
      const double *v = energy + after_forces;
      // LAMMPS order xx, yy, zz, xy, xz, yz; symmetrize against round-off.
      virial[0] += v[0];
      virial[1] += v[4];
      virial[2] += v[8];
      virial[3] += 0.5 * (v[1] + v[3]);
      virial[4] += 0.5 * (v[2] + v[6]);
      virial[5] += 0.5 * (v[5] + v[7]);
    }
  }

  if (M > 0) committee_spread(have_members, member_energy_local);

  if (direct_forces) {
    remove_net_force(atom->f, 3, model_force_sum);
    // No virial: NaN, not zero, so that a pressure can never look valid (thermo prints nan,
    // fix npt stops with "Non-numeric pressure"). LAMMPS asks for the virial at every run's
    // setup whether or not it is used, so refusing here would forbid every run.
    if (vflag_global)
      for (int k = 0; k < 6; k++) virial[k] = std::numeric_limits<double>::quiet_NaN();
  }
}

// A direct-force model does not conserve momentum exactly: remove the mean force over the
// whole system (not per rank, so that 1 rank and N ranks agree). Ghost forces of direct models
// are zero, so the owned atoms' model forces are all of it (other pair styles of a
// pair hybrid/overlay are left alone). Collective: every rank calls it.
// rows: (nlocal, width) per owned atom, the forces (width 3) or a committee's member forces
// (width 3M); local_sum (width): the model's part of them summed over this rank's owned atoms.
void PairMLIP::remove_net_force(double **rows, int width, const double *local_sum)
{
  const int nlocal = atom->nlocal;
  std::vector<double> total(width, 0.0);
  MPI_Allreduce(local_sum, total.data(), width, MPI_DOUBLE, MPI_SUM, world);
  if (atom->natoms <= 0) return;
  for (int i = 0; i < nlocal; i++)
    for (int c = 0; c < width; c++) rows[i][c] -= total[c] / (double) atom->natoms;
}

/* ---------------------------------------------------------------------- */
// Committee spread (the definitions of mlip's ASE calculator, mlip/calculators/ase.py):
//   force_uncertainty[i] = sqrt(mean_m |F_im - mean_m F_im|^2)    per owned atom, eV/Å
//   energy spread        = standard deviation over m of member m's total energy, eV
// Collective: every rank calls it, with or without owned atoms, so that 1 and N ranks agree.

void PairMLIP::grow_member_arrays()
{
  if (atom->nmax <= nmax_members) return;
  nmax_members = atom->nmax;
  memory->destroy(member_forces);
  memory->destroy(force_uncertainty);
  memory->create(member_forces, nmax_members, 3 * num_members, "pair:member_forces");
  memory->create(force_uncertainty, nmax_members, "pair:force_uncertainty");
}

void PairMLIP::committee_spread(bool have_members, const std::vector<double> &member_energy_local)
{
  const int M = num_members;
  const int nlocal = atom->nlocal;
  int have_local = have_members ? 1 : 0, have_all = 0;
  MPI_Allreduce(&have_local, &have_all, 1, MPI_INT, MPI_MIN, world);
  if (!have_all) {
    // Not a silent number: NaN in compute pair and fix pair, and a warning once.
    if (comm->me == 0 && !warned_no_member_forces)
      error->warning(FLERR,
                     "pair_style mlip: committee file {} was deployed without member forces: its "
                     "spread is reported as NaN; re-deploy it with `mlip deploy` to get it",
                     model_path);
    warned_no_member_forces = true;
    for (int i = 0; i < nlocal; i++) force_uncertainty[i] = std::numeric_limits<double>::quiet_NaN();
    for (int k = 0; k < nextra; k++) pvector[k] = std::numeric_limits<double>::quiet_NaN();
    return;
  }

  comm->reverse_comm(this);    // member forces on ghosts -> their owners

  if (direct_forces) {
    // As for the forces: each member's mean force over the whole system is removed.
    std::vector<double> local_sum(3 * M, 0.0);
    for (int i = 0; i < nlocal; i++)
      for (int c = 0; c < 3 * M; c++) local_sum[c] += member_forces[i][c];
    remove_net_force(member_forces, 3 * M, local_sum.data());
  }

  double local_max = 0.0, local_sum = 0.0;
  for (int i = 0; i < nlocal; i++) {
    double squares = 0.0;
    for (int k = 0; k < 3; k++) {
      const double *component = member_forces[i] + k * M;    // member m at component[m]
      double mean = 0.0;
      for (int m = 0; m < M; m++) mean += component[m];
      mean /= M;
      for (int m = 0; m < M; m++) squares += (component[m] - mean) * (component[m] - mean);
    }
    force_uncertainty[i] = std::sqrt(squares / M);
    local_max = std::max(local_max, force_uncertainty[i]);
    local_sum += force_uncertainty[i];
  }
  double global_max = 0.0, global_sum = 0.0;
  MPI_Allreduce(&local_max, &global_max, 1, MPI_DOUBLE, MPI_MAX, world);
  MPI_Allreduce(&local_sum, &global_sum, 1, MPI_DOUBLE, MPI_SUM, world);
  std::vector<double> member_energy(M, 0.0);
  MPI_Allreduce(member_energy_local.data(), member_energy.data(), M, MPI_DOUBLE, MPI_SUM, world);
  double mean_energy = 0.0, energy_squares = 0.0;
  for (int m = 0; m < M; m++) mean_energy += member_energy[m] / M;
  for (int m = 0; m < M; m++) energy_squares += (member_energy[m] - mean_energy) * (member_energy[m] - mean_energy);

  // compute pair sums pvector over ranks: the global values live on rank 0 only.
  const bool root = comm->me == 0;
  pvector[0] = root ? std::sqrt(energy_squares / M) : 0.0;
  pvector[1] = root ? global_max : 0.0;
  pvector[2] = root && atom->natoms > 0 ? global_sum / (double) atom->natoms : 0.0;
}

int PairMLIP::pack_reverse_comm(int n, int first, double *buf)
{
  int count = 0;
  for (int i = first; i < first + n; i++)
    for (int c = 0; c < 3 * num_members; c++) buf[count++] = member_forces[i][c];
  return count;
}

void PairMLIP::unpack_reverse_comm(int n, int *list, double *buf)
{
  int count = 0;
  for (int i = 0; i < n; i++)
    for (int c = 0; c < 3 * num_members; c++) member_forces[list[i]][c] += buf[count++];
}

// `fix ID all pair N mlip force_uncertainty 0|1`: the per-atom force spread of a committee.
void *PairMLIP::extract_peratom(const char *name, int &ncol)
{
  if (strcmp(name, "force_uncertainty") != 0) return nullptr;
  if (num_members == 0)
    error->all(FLERR,
               "pair_style mlip: force_uncertainty needs a committee file (`mlip deploy A B C -o "
               "committee.pt`); {} is a single model",
               model_path);
  ncol = 0;
  return (void *) force_uncertainty;
}

// fix pair's trigger for flag 1. The spread is computed at every step anyway (it costs a
// reverse communication, no model work), so both flags work.
void *PairMLIP::extract(const char *name, int &dim)
{
  dim = 0;
  if (strcmp(name, "force_uncertainty_flag") == 0 && num_members > 0) return (void *) &uncertainty_trigger;
  return nullptr;
}

double PairMLIP::memory_usage()
{
  return Pair::memory_usage() + (double) nmax_members * (3 * num_members + 1) * sizeof(double);
}
