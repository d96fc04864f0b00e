"""Field names of the data dictionaries that flow through mlip.

A structure (or a batch of structures) is a ``Dict[str, torch.Tensor]``. Every stage reads some
of these keys and adds others; none rewrites a key another stage wrote. Shapes use
N = nodes (atoms, ghosts included), E = edges, B = structures in a batch.
Units: Å, eV, eV/Å, eV/Å^3 (ASE sign: stress = (1/V) dE/dstrain, negative under compression).
"""

# --- structure -------------------------------------------------------------------------------
POSITIONS = "positions"  # (N, 3) float | Cartesian positions, Å
ATOM_TYPES = "atom_types"  # (N,) int64 | index into the model's type names
CELL = "cell"  # (B, 3, 3) float | lattice vectors as rows, Å (zeros where non-periodic)
PBC = "pbc"  # (B, 3) bool | periodicity along each lattice vector
BATCH = "batch"  # (N,) int64 | index of the structure each node belongs to
NUM_ATOMS = "num_atoms"  # (B,) int64 | nodes per structure

# --- graph -----------------------------------------------------------------------------------
EDGE_INDEX = "edge_index"  # (2, E) int64 | row 0: center i, row 1: neighbor j
EDGE_CELL_SHIFTS = "edge_cell_shifts"  # (E, 3) int64 | image of j: integer multiples of the cell rows
EDGE_SHIFTS = "edge_shifts"  # (E, 3) float | Cartesian shift, Å: r_ij = x_j - x_i + shift_ij
EDGES_PAIRED = "edges_paired"  # () bool | edge k + E/2 is the reverse of edge k (data.pair_edges)

# --- labels and predictions --------------------------------------------------------------------
ENERGY = "energy"  # (B,) float64 | total energy, eV
ATOMIC_ENERGIES = "atomic_energies"  # (N,) float64 | per-atom energy incl. reference energies, eV
MEMBER_ATOMIC_ENERGIES = "member_atomic_energies"  # (N, M) float64 | ATOMIC_ENERGIES of each of a committee's M models, eV
MEMBER_ENERGIES = "member_energies"  # (B, M) float64 | ENERGY of each of a committee's M models, eV
ENERGY_UNCERTAINTY = "energy_uncertainty"  # (B,) float64 | standard deviation of a committee's member energies, eV
FORCES = "forces"  # (N, 3) float | eV/Å
MEMBER_FORCES = "member_forces"  # (N, 3, M) float | FORCES of each of a committee's M models, eV/Å
FORCE_UNCERTAINTY = "force_uncertainty"  # (N,) float64 | per atom sqrt(mean_m |F_m - mean F|^2) of a committee, eV/Å
VIRIAL = "virial"  # (B, 3, 3) float | W = -sum_edges r_ij (x) dE/dr_ij, eV
STRESS = "stress"  # (B, 3, 3) float | -W / V, eV/Å^3 (periodic structures only)
PROPERTY = "property"  # (B,) float64 | a per-structure target of a property model (task: property), in its own unit
PROPERTY_UNCERTAINTY = "property_uncertainty"  # (B,) float64 | a property committee's spread: std over its models

# --- bookkeeping -------------------------------------------------------------------------------
# A batch carries a label when any of its structures does; these masks say where it exists. Where a
# mask is False the label holds a placeholder zero that no loss or metric may read.
HAS_ENERGY = "has_energy"  # (B,) bool | this structure carries an energy label
HAS_FORCES = "has_forces"  # (N,) bool | this atom carries a force label (its structure does)
HAS_STRESS = "has_stress"  # (B,) bool | this structure carries a stress label
HAS_PROPERTY = "has_property"  # (B,) bool | this structure carries a property label
STRUCTURE_INDEX = "structure_index"  # (B,) int64 | index of each structure in its dataset
STAND_IN = "stand_in"  # () bool, on the host | distributed training: this rank's stand-in for an empty share of
#   a global batch (one structure of it, whose loss must count zero; see data.BatchLoader)
