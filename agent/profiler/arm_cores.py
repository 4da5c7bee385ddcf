"""ARM `CPU implementer` / `CPU part` ids from /proc/cpuinfo, mapped to the names vendors print.

arm64 /proc/cpuinfo has no model name: the core is only known by these hex ids. The table follows the
ids in each vendor's Technical Reference Manual (MIDR_EL1.PartNum), the same ids util-linux `lscpu`
decodes. Unknown ids are kept as `implementer:part` so the profile still says exactly what was seen.
"""

from __future__ import annotations

IMPLEMENTERS: dict[int, str] = {
    0x41: "ARM",
    0x42: "Broadcom",
    0x43: "Cavium",
    0x46: "Fujitsu",
    0x48: "HiSilicon",
    0x4E: "NVIDIA",
    0x51: "Qualcomm",
    0x53: "Samsung",
    0x61: "Apple",
    0xC0: "Ampere",
}

PARTS: dict[tuple[int, int], str] = {
    # Arm Ltd (0x41): 32-bit cores
    (0x41, 0xC05): "Cortex-A5",
    (0x41, 0xC07): "Cortex-A7",
    (0x41, 0xC08): "Cortex-A8",
    (0x41, 0xC09): "Cortex-A9",
    (0x41, 0xC0D): "Cortex-A17",
    (0x41, 0xC0F): "Cortex-A15",
    (0x41, 0xC0E): "Cortex-A17",
    # Arm Ltd (0x41): ARMv8 / ARMv9 application cores
    (0x41, 0xD01): "Cortex-A32",
    (0x41, 0xD02): "Cortex-A34",
    (0x41, 0xD03): "Cortex-A53",
    (0x41, 0xD04): "Cortex-A35",
    (0x41, 0xD05): "Cortex-A55",
    (0x41, 0xD06): "Cortex-A65",
    (0x41, 0xD07): "Cortex-A57",
    (0x41, 0xD08): "Cortex-A72",
    (0x41, 0xD09): "Cortex-A73",
    (0x41, 0xD0A): "Cortex-A75",
    (0x41, 0xD0B): "Cortex-A76",
    (0x41, 0xD0C): "Neoverse-N1",
    (0x41, 0xD0D): "Cortex-A77",
    (0x41, 0xD0E): "Cortex-A76AE",
    (0x41, 0xD40): "Neoverse-V1",
    (0x41, 0xD41): "Cortex-A78",
    (0x41, 0xD42): "Cortex-A78AE",
    (0x41, 0xD43): "Cortex-A65AE",
    (0x41, 0xD44): "Cortex-X1",
    (0x41, 0xD46): "Cortex-A510",
    (0x41, 0xD47): "Cortex-A710",
    (0x41, 0xD48): "Cortex-X2",
    (0x41, 0xD49): "Neoverse-N2",
    (0x41, 0xD4A): "Neoverse-E1",
    (0x41, 0xD4B): "Cortex-A78C",
    (0x41, 0xD4C): "Cortex-X1C",
    (0x41, 0xD4D): "Cortex-A715",
    (0x41, 0xD4E): "Cortex-X3",
    (0x41, 0xD4F): "Neoverse-V2",
    (0x41, 0xD80): "Cortex-A520",
    (0x41, 0xD81): "Cortex-A720",
    (0x41, 0xD82): "Cortex-X4",
    # NVIDIA (0x4e)
    (0x4E, 0x003): "Denver 2",
    (0x4E, 0x004): "Carmel",
    # Qualcomm (0x51)
    (0x51, 0x800): "Kryo 2XX Gold",
    (0x51, 0x801): "Kryo 2XX Silver",
    (0x51, 0x802): "Kryo 3XX Gold",
    (0x51, 0x803): "Kryo 3XX Silver",
    (0x51, 0x804): "Kryo 4XX Gold",
    (0x51, 0x805): "Kryo 4XX Silver",
    (0x51, 0xC00): "Falkor",
    (0x51, 0xC01): "Saphira",
    # Ampere (0xc0)
    (0xC0, 0xAC3): "Ampere-1",
    (0xC0, 0xAC4): "Ampere-1a",
}


def implementer_name(implementer: int) -> str:
    return IMPLEMENTERS.get(implementer, f"implementer {implementer:#04x}")


def core_name(implementer: int, part: int) -> str:
    """The marketing name of a core, or `0xIMPL:0xPART` when the table does not know it yet."""
    return PARTS.get((implementer, part), f"{implementer:#04x}:{part:#05x}")
