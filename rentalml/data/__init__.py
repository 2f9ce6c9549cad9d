from rentalml.data.dataset import Dataset, InteractionMatrix

__all__ = ["Dataset", "InteractionMatrix"]
