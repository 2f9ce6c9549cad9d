"""rentalml.ops"""
