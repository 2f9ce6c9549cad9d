"""rentalml.features"""
