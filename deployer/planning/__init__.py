"""The pure core: estimate, pack, place, describe engines, re-plan. No I/O."""
